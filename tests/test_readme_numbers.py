"""The README's routers table is typed by hand from `reproduction/clm/routers.json`; this
test keeps the two in step, so a rerun of the study that moves a number across a rounding
edge (it happened: DUME 33.52 -> 33.49) cannot leave the README quoting the old one."""
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# README row label -> the report's row names (one per '/'-separated figure in a cell).
ROWS = {
    "DUME": ["DUME"],
    "balanced": ["DUME_balanced"],
    "loss-aware": ["DUME_loss"],
    "layer-sequential": ["DUME_sequential"],
    "layer-sequential, balanced": ["DUME_sequential_balanced"],
    "mergekit hidden gate (ours)": ["mergekit_hidden"],
    "real `mergekit-moe`, hidden, averaged base": ["mergekit-moe:hidden@model_averaging"],
    "real `mergekit-moe`, cheap_embed, averaged base": ["mergekit-moe:cheap_embed@model_averaging"],
    "real `mergekit-moe`, random, averaged base": ["mergekit-moe:random@model_averaging"],
    "real `mergekit-moe`, hidden / cheap_embed / random, seed base": [
        "mergekit-moe:hidden@seed", "mergekit-moe:cheap_embed@seed", "mergekit-moe:random@seed"],
    "expert weights only": ["weights"],
    "context-aware (not stock)": ["DUME_context"],
    "context-aware, balanced (not stock)": ["DUME_context_balanced"],
}


def _readme_table() -> dict[str, tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    start = text.index("| router | default set | held-out set |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        label, wiki, heldout = (cell.strip() for cell in line.strip("|").split("|"))
        rows[label] = (wiki, heldout)
    return rows


def _figures(cell: str) -> list[float]:
    """'−56 / −54 / −58 %' -> [-56.0, -54.0, -58.0]; the README writes a true minus sign."""
    return [float(x.replace("−", "-")) for x in re.findall(r"[−-]?\d+(?:\.\d+)?", cell)]


def _quoted_as(value: float, written: float) -> bool:
    """The README's figure is the report's mean rounded to the digits it shows."""
    digits = len(str(written).split(".")[1]) if not float(written).is_integer() else 0
    return abs(value - written) <= 0.5 * 10 ** -digits + 1e-9


def test_readme_routers_table_matches_the_committed_report():
    report = json.loads((REPO / "reproduction/clm/routers.json").read_text())["sets"]
    table = _readme_table()
    assert set(table) == set(ROWS), "README routers table rows changed: update ROWS"
    wrong = []
    for label, names in ROWS.items():
        for set_name, cell in zip(("wiki", "heldout"), table[label]):
            written = _figures(cell)
            assert len(written) == len(names), (label, cell)
            for name, figure in zip(names, written):
                mean = report[set_name]["rows"][name]["gap_closed"]["mean"]
                if not _quoted_as(mean, figure):
                    wrong.append(f"{label} / {set_name}: README {figure}, report {mean:.2f}")
    assert not wrong, "README routers table out of step with routers.json:\n" + "\n".join(wrong)


def test_figures_reads_the_readme_minus_sign():
    assert _figures("−56 / −54 / −58 %") == [-56.0, -54.0, -58.0]
    assert _figures("−0.3 %") == [-0.3]
    assert _quoted_as(33.49, 33.0) and not _quoted_as(33.52, 33.0)
    assert _quoted_as(-0.27, -0.3) and not _quoted_as(-0.27, -0.4)
