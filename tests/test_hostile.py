"""A hostile user's inputs (issue 20): nothing lost, nothing shared, nothing miscounted.

Each test reproduces one case that used to destroy work, wreck a concurrent run, end in a
traceback or reuse a stale result, and checks what happens now: one `error:` line and
exit 2 with every input intact, or a correct result.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import one_error_line, tiny_llama, tiny_tokenizer
from tests.fixtures import (  # noqa: F401  (pytest fixtures)
    copy_run,
    corpus_dir,
    datasets_cache,
    method_args,
    run_script,
    single_thread,
    strategy_run,
    trained_run,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")
NAMES = ("law", "med", "code")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Three tiny experts (with tokenizer) and their texts, in one folder."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hostile")
    tok = tiny_tokenizer()
    for i, n in enumerate(NAMES):
        tiny_llama(seed=i, max_position_embeddings=256).save_pretrained(root / "experts" / n)
        tok.save_pretrained(root / "experts" / n)
    data = root / "data"
    data.mkdir()
    for n in NAMES:
        (data / f"{n}.txt").write_text("\n\n".join(f"The {n} text number {i} says {n} things." for i in range(24)))
    return root


def _config(root: Path, out, **over) -> dict:
    cfg = {"experts": [{"name": n, "model": str(root / "experts" / n), "data": str(root / "data" / f"{n}.txt")}
                       for n in NAMES],
           "dtype": "float32", "out": str(out), "seq_len": 32, "batch_size": 4, "held_out": 0.1}
    cfg.update(over)
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _build(capsys, config: Path, *flags) -> int:
    from dume.cli import main

    capsys.readouterr()
    return main(["build", str(config), *flags])


def _experts_load(root: Path) -> None:
    from transformers import AutoModelForCausalLM

    for n in NAMES:
        AutoModelForCausalLM.from_pretrained(root / "experts" / n)


def _hold_lock(path: Path, release: Path) -> subprocess.Popen:
    """Another process holding `path`'s writer lock until `release` exists."""
    code = ("import sys, time, pathlib\n"
            "from dume.checkpoint.outputs import output_lock\n"
            "with output_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n"
            "    while not pathlib.Path(sys.argv[2]).exists():\n"
            "        time.sleep(0.05)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(path), str(release)], cwd=REPO, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


# --------------------------------------------------------------------------- 1. output paths


@pytest.mark.parametrize("where", ["experts_folder", "inside_expert", "is_expert", "contains_config", "data_folder"])
def test_build_never_writes_over_or_inside_what_it_reads(experts, tmp_path, capsys, where):
    root = experts
    out = {"experts_folder": root / "experts", "inside_expert": root / "experts" / "law" / "moe",
           "is_expert": root / "experts" / "med", "contains_config": tmp_path / "cfgdir",
           "data_folder": root / "data" / "moe"}[where]
    config = (tmp_path / "cfgdir" / "sub" / "build.yaml") if where == "contains_config" else tmp_path / "build.yaml"
    cfg = _config(root, out)
    if where == "data_folder":
        cfg["experts"][1]["data"] = str(root / "data")  # a folder of data: out may not lie inside it
    rc = _build(capsys, _write(config, cfg), "--overwrite")
    one_error_line(capsys, rc, str(out))
    _experts_load(root)  # all three experts still load
    assert not (root / "experts" / "law" / "moe").exists() and not (root / "data" / "moe").exists()


def test_a_folder_holding_another_checkpoint_is_never_replaced(tmp_path):
    from dume.errors import DumeError
    from dume.checkpoint.io import atomic_dir

    outer = tmp_path / "expert"
    tiny_llama().save_pretrained(outer)
    tiny_llama(seed=1).save_pretrained(outer / "moe")  # a model someone put inside it
    with pytest.raises(DumeError, match="holds another checkpoint"):
        with atomic_dir(outer) as stage:
            (stage / "config.json").write_text("{}")
    assert (outer / "moe" / "model.safetensors").is_file() and (outer / "model.safetensors").is_file()


# ---------------------------------------------------------------------- 2. one writer per output


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    from dume.errors import DumeError
    from dume.checkpoint.io import atomic_dir

    target = tmp_path / "model"
    holder = _hold_lock(target, tmp_path / "go")
    try:
        with pytest.raises(DumeError, match=rf"another run \(pid {holder.pid}.*\) is writing .*model"):
            with atomic_dir(target):
                pass
    finally:
        (tmp_path / "go").touch()
        holder.wait(10)
    with atomic_dir(target) as stage:  # free again, and the lock file is gone afterwards
        (stage / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    assert not (tmp_path / ".model.lock").exists()


def test_two_builds_to_one_out_do_not_both_write(experts, tmp_path, capsys):
    out = tmp_path / "moe"
    config = _write(tmp_path / "build.yaml", _config(experts, out))
    holder = _hold_lock(out, tmp_path / "go")
    try:
        rc = _build(capsys, config)
        one_error_line(capsys, rc, "another run", f"pid {holder.pid}", str(out))
    finally:
        (tmp_path / "go").touch()
        holder.wait(10)
    assert not out.exists()


def test_a_live_writers_staging_directory_is_kept(tmp_path):
    from dume.checkpoint.io import cleanup_stale_tmp

    target = tmp_path / "model"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".model.tmp-{sleeper.pid}-abcdef12"
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()
        dead = tmp_path / f".model.tmp-{dead_pid}-abcdef12"
        live.mkdir()
        dead.mkdir()
        cleanup_stale_tmp(target)
        assert live.is_dir() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_replacing_a_model_never_leaves_its_path_absent(tmp_path):
    from dume.checkpoint.io import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as stage:
        (stage / "config.json").write_text("0")
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (target / "config.json").is_file():
                missing.append(time.monotonic())

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(1, 40):
            with atomic_dir(target) as stage:
                (stage / "config.json").write_text(str(i))
    finally:
        stop.set()
        t.join()
    assert not missing, f"absent {len(missing)} times"
    assert (target / "config.json").read_text() == "39"
    assert not list(tmp_path.glob(".model.*"))  # no staging or lock left behind


def test_the_exists_check_is_repeated_at_the_rename(tmp_path):
    from dume.errors import DumeError
    from dume.checkpoint.io import atomic_dir

    target = tmp_path / "model"
    with pytest.raises(DumeError, match="appeared while it was being written"):
        with atomic_dir(target, overwrite=False) as stage:
            (stage / "mine").write_text("mine")
            target.mkdir()  # another program (not using our lock) made it meanwhile
            (target / "theirs").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]


def test_two_strategy_runs_on_one_run_directory(tmp_path, strategy_run, corpus_dir, capsys):
    """Two `--method DUME --redo` at once: the first finishes, the second refuses at once,
    and models/DUME is present (and loadable) throughout."""
    import clm_moerging_strategies_eval as strategies

    run_dir = copy_run(strategy_run, tmp_path / "run")
    model = run_dir / "models" / "DUME"
    env = {**os.environ, "DUME_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "clm_moerging_strategies_eval.py",
                              *method_args(run_dir, corpus_dir, "DUME", "--redo")], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (model / "config.json").is_file():
                missing.append(1)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "models" / ".DUME.lock").exists():
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        capsys.readouterr()
        rc = run_script(strategies.main, method_args(run_dir, corpus_dir, "DUME", "--redo"))
        one_error_line(capsys, rc, "another run", f"pid {first.pid}", "models/DUME")
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 0, out
    finally:
        stop.set()
        watcher.join()
    assert not missing
    from dume.moe.edit import load_moe

    load_moe(model)
    assert json.loads((run_dir / "results" / "DUME.json").read_text())["results"]


# ------------------------------------------------------------------ 3. OS and format errors


def _tiny_tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (root only); None where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return path if r.returncode == 0 else None


def test_a_full_disk_is_found_before_the_work(experts, tmp_path, capsys, monkeypatch):
    import shutil as sh

    out = tmp_path / "moe"
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=10_000))
    rc = _build(capsys, _write(tmp_path / "build.yaml", _config(experts, out)))
    one_error_line(capsys, rc, "not enough disk", "needed", "10.0 KB free", str(tmp_path))
    assert not out.exists()


def test_a_disk_that_fills_during_the_write_is_one_line(experts, tmp_path, capsys, monkeypatch):
    """The write itself fails (the space went elsewhere after the check): one line, the
    previous output intact."""
    import dume.moe.merge

    out = tmp_path / "moe"
    config = _write(tmp_path / "build.yaml", _config(experts, out))
    assert _build(capsys, config) == 0
    before = sorted(p.name for p in out.iterdir())

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))

    monkeypatch.setattr(dume.moe.merge, "write_safetensors", full)
    rc = _build(capsys, config, "--overwrite")
    one_error_line(capsys, rc, "disk full", "model.safetensors", "free space")
    assert sorted(p.name for p in out.iterdir()) == before
    assert not list(tmp_path.glob(".moe.tmp-*"))


def test_a_real_full_filesystem_is_one_line(experts, tmp_path, capsys, monkeypatch):
    small = _tiny_tmpfs(tmp_path / "small", "64k")
    if small is None:
        pytest.skip("mounting a tmpfs needs root and mount rights")
    try:
        import dume.moe.merge

        monkeypatch.setattr(dume.moe.merge, "require_free_space", lambda *a, **k: None)  # reach the real write
        rc = _build(capsys, _write(tmp_path / "build.yaml", _config(experts, small / "moe")))
        one_error_line(capsys, rc, "disk full")
        assert not (small / "moe").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)


BAD_FILES = {
    "binary.txt": (b"\x00\x01\x02\xff" * 64, "binary data"),
    "utf16.txt": ("The law text.\n\nAnother one.".encode("utf-16"), "UTF-16"),
    "latin1.txt": ("Caf\xe9 law text.".encode("latin-1"), "not UTF-8"),
    "bad.json": (b'{"text": "unterminated', "not valid JSON"),
    "binary.jsonl": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data"),
    "notjson.jsonl": (b'{"text": "ok"}\nthis is not json\n', "line 2 is not JSON"),
    "corrupt.parquet": (b"PAR1 this is not really parquet PAR1", "not a readable Parquet file"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_unreadable_data_files_are_one_line_naming_the_file(experts, tmp_path, capsys, name):
    raw, needle = BAD_FILES[name]
    bad = tmp_path / name
    bad.write_bytes(raw)
    cfg = _config(experts, tmp_path / "moe")
    cfg["experts"][0]["data"] = str(bad)
    rc = _build(capsys, _write(tmp_path / "build.yaml", cfg))
    one_error_line(capsys, rc, needle, str(bad))
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("change,needle", [
    ({"out": "FILE/moe"}, "lies under the file"),
    ({"out": "/proc/self/moe"}, "pseudo-filesystem"),
    ({"device": "banana"}, "not a device name"),
    ({"device": "cuda"}, "no usable CUDA GPU"),
    ({"device": "cuda:7"}, "CUDA"),
    ({"device": 3}, "device must be a string"),
    ({"seed": 2**70}, "below 2**32"),
    ({"seed": -1}, "seed must be an integer >= 0"),
])
def test_bad_build_values_are_refused_while_parsing(experts, tmp_path, capsys, monkeypatch, change, needle):
    """Refused by `load_spec`, before any expert is hashed or any data read."""
    import dume.checkpoint.experts

    if change.get("device", "").__class__ is str and str(change.get("device")).startswith("cuda") \
            and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "FILE").write_text("a file")
    if "out" in change:
        change = {"out": str(tmp_path / change["out"]) if not change["out"].startswith("/") else change["out"]}
    monkeypatch.setattr(dume.checkpoint.experts, "check_experts", lambda *a, **k: pytest.fail("experts were hashed"))
    rc = _build(capsys, _write(tmp_path / "build.yaml", {**_config(experts, tmp_path / "moe"), **change}))
    one_error_line(capsys, rc, needle)


def test_an_unwritable_out_folder_is_refused_while_parsing(experts, tmp_path, capsys):
    if os.geteuid() == 0:
        ro = _tiny_tmpfs(tmp_path / "ro", "1m")
        if ro is None:
            pytest.skip("needs a read-only mount (root) or a non-root user")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        needle = "read-only"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        needle = "not writable"
    try:
        rc = _build(capsys, _write(tmp_path / "build.yaml", _config(experts, ro / "moe")))
        one_error_line(capsys, rc, needle)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
        else:
            ro.chmod(0o700)


def test_an_os_error_reaching_a_script_is_one_line(capsys):
    from dume.cli import run_main

    def body(argv):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/results.json")

    rc = run_main(body, [])
    one_error_line(capsys, rc, "permission denied", "/somewhere/results.json")


def test_a_corrupt_safetensors_file_is_one_line(tmp_path, capsys):
    from dume.cli import run_main
    from safetensors.torch import load_file

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    rc = run_main(lambda argv: load_file(str(bad)), [])
    one_error_line(capsys, rc, "safetensors")


# --------------------------------------------------------------------- 4. a changed corpus


def test_a_domain_text_changed_in_place_is_noticed(tmp_path, strategy_run, corpus_dir, capsys):
    import clm_moerging_strategies_eval as strategies

    run_dir = copy_run(strategy_run, tmp_path / "run")
    data = Path(shutil.copytree(corpus_dir, tmp_path / "data"))
    assert run_script(strategies.main, method_args(run_dir, data, "DUME")) == 0  # the new data folder: redone
    capsys.readouterr()
    assert run_script(strategies.main, method_args(run_dir, data, "DUME")) == 0
    assert "exists; skipping" in capsys.readouterr().out
    before = json.loads((run_dir / "results" / "DUME.json").read_text())

    text = (data / "math.txt").read_text()
    (data / "math.txt").write_text(text + "\n\nlemma proof integral theorem ring group field prime. 9999\n")
    assert run_script(strategies.main, method_args(run_dir, data, "DUME")) == 0
    out = capsys.readouterr().out
    assert "the text of domain 'math' changed since (files changed: math.txt); recomputing" in out, out
    assert "differ in corpus; recollecting" in out and "using cached statistics" not in out
    after = json.loads((run_dir / "results" / "DUME.json").read_text())
    assert after["corpus"]["math"] != before["corpus"]["math"]
    assert after["corpus"]["code"] == before["corpus"]["code"]
    # a training-free row that reuses the cached statistics now uses the new ones
    assert run_script(strategies.main, method_args(run_dir, data, "centroid")) == 0
    assert "using cached statistics" in capsys.readouterr().out


# ------------------------------------------------------------------ 7. warnings, not silence


def test_the_same_checkpoint_under_two_names_is_a_warning(experts, tmp_path, capsys):
    cfg = _config(experts, tmp_path / "moe")
    cfg["experts"][2]["model"] = cfg["experts"][0]["model"]
    assert _build(capsys, _write(tmp_path / "build.yaml", cfg)) == 0
    out = capsys.readouterr().out
    assert "warning: experts expert 0" in out and "expert 2" in out and "same checkpoint" in out


def test_combining_the_same_statistics_twice_is_a_warning(experts, tmp_path, capsys):
    import dume_experts

    moe = tmp_path / "moe"
    assert _build(capsys, _write(tmp_path / "build.yaml", _config(experts, moe))) == 0
    copy = Path(shutil.copytree(moe / "dume_stats", tmp_path / "copy"))
    for parts in ([moe / "dume_stats", moe / "dume_stats"], [moe / "dume_stats", copy]):
        capsys.readouterr()
        rc = run_script(dume_experts.main, ["combine", *map(str, parts), "--out", str(tmp_path / "sum"),
                                            "--overwrite"])
        out = capsys.readouterr().out
        assert rc == 0 and "warning:" in out and "same statistics" in out and "twice" in out


def test_a_hub_id_without_network_fails_fast_with_one_line(tmp_path, capsys, monkeypatch):
    """No offline flags, no network: one line within 5 s (huggingface_hub alone retried
    for ~31 s). The endpoint is a local server that accepts connections and never answers
    (what a closed network's proxy does)."""
    import socket

    from dume.cli import run_main
    from dume.checkpoint.resolve import resolve_expert

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        start = time.monotonic()
        rc = run_main(lambda argv: resolve_expert("someone/not-cached-model"), [])
        took = time.monotonic() - start
    finally:
        silent.close()
    one_error_line(capsys, rc, "someone/not-cached-model", "cannot be reached", "local checkpoint")
    assert took < 5, took


# ------------------------------------------------------------------ further hostile inputs


def test_sigterm_during_a_build_removes_its_staging_and_keeps_nothing_half_written(experts, tmp_path):
    """SIGTERM (what `kill`, schedulers and launchers send) ran no cleanup before: the
    staging folder stayed until a rerun removed it. Now it is handled like Ctrl-C."""
    data = tmp_path / "big.txt"
    data.write_text("\n\n".join(f"A long law document {i} " + "with many words " * 40 for i in range(400)))
    cfg = _config(experts, tmp_path / "moe")
    for e in cfg["experts"]:
        e["data"] = str(data)
    config = _write(tmp_path / "build.yaml", cfg)
    p = subprocess.Popen([sys.executable, "-m", "dume", "build", str(config)], cwd=REPO,
                         env={**os.environ, "DUME_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".moe.tmp-*")):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert not (tmp_path / "moe").exists()
    assert not list(tmp_path.glob(".moe*")), list(tmp_path.glob(".moe*"))


@pytest.mark.parametrize("name", ["../../etc", "a/b", ".hidden", "tab\there"])
def test_expert_names_that_could_be_paths_are_refused(experts, tmp_path, capsys, name):
    cfg = _config(experts, tmp_path / "moe")
    cfg["experts"][0]["name"] = name
    rc = _build(capsys, _write(tmp_path / "build.yaml", cfg))
    one_error_line(capsys, rc, "must not contain")


def test_a_run_directory_that_is_a_file_is_one_line(tmp_path, corpus_dir, capsys):
    import clm_moerging_strategies_eval as strategies

    f = tmp_path / "run.txt"
    f.write_text("not a folder")
    rc = run_script(strategies.main, method_args(f, corpus_dir, "DUME"))
    one_error_line(capsys, rc, "is a file")
    assert f.read_text() == "not a folder"


def test_an_edit_without_disk_space_is_one_line_before_writing(experts, tmp_path, capsys, monkeypatch):
    import shutil as sh

    import dume_experts

    moe = tmp_path / "moe"
    assert _build(capsys, _write(tmp_path / "build.yaml", _config(experts, moe))) == 0
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1000))
    capsys.readouterr()
    rc = run_script(dume_experts.main, ["remove", "--moe", str(moe), "--domain", "law", "--out", str(tmp_path / "rm")])
    one_error_line(capsys, rc, "not enough disk", "1.0 KB free")
    assert not (tmp_path / "rm").exists() and not list(tmp_path.glob(".rm.tmp-*"))


@pytest.mark.parametrize("device,needle", [("banana", "not a device name"), ("cuda:3", "CUDA")])
def test_a_script_device_this_machine_lacks_is_one_line(tmp_path, corpus_dir, capsys, device, needle):
    import clm_moerging_strategies_eval as strategies

    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has a GPU")
    rc = run_script(strategies.main, method_args(tmp_path / "run", corpus_dir, "DUME", "--device", device))
    one_error_line(capsys, rc, needle)
    assert not (tmp_path / "run").exists()


def test_the_ranks_of_one_launch_do_not_lock_each_other_out(tmp_path, monkeypatch):
    """Rank 0 of an `accelerate launch` holds the one-writer lock for its launch; rank 1
    must not be refused by it (it was: the launch then failed)."""
    from dume.checkpoint.io import atomic_dir

    target = tmp_path / "model"
    holder = _hold_lock(target, tmp_path / "go")  # stands for rank 0
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        with atomic_dir(target) as stage:
            (stage / "x").write_text("rank 1")
    finally:
        (tmp_path / "go").touch()
        holder.wait(10)
    assert (target / "x").read_text() == "rank 1"


def test_readers_share_a_built_input_and_a_writer_waits_for_them(tmp_path):
    """Strategies built in parallel read the shared zero-gate MoE together
    (`reading_lock`): a second reader is not held up by the first, while a writer -- a
    rebuild -- is kept out until every reader is done."""
    from dume.checkpoint.outputs import output_lock, reading_lock
    from dume.errors import DumeError

    base = tmp_path / "base"
    base.mkdir()
    code = ("import time\nfrom dume.checkpoint.outputs import reading_lock\n"
            f"with reading_lock({str(base)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.time()
        with reading_lock(base):
            pass
        assert time.time() - start < 5
        with pytest.raises(DumeError, match="another run"):
            with output_lock(base):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(base):  # free once the reader is gone
        pass
