"""Two processes (``accelerate launch``, gloo on CPU) train and score exactly like one process.

``accelerate launch --cpu --num_processes 2`` starts a *single* process (accelerate's simple
launcher; several CPU processes need mpirun), so the CPU run here uses ``--multi_gpu`` with no
visible GPU: accelerate's torchrun launcher then starts two processes and they join with gloo
(DistributedType.MULTI_CPU). A small wrapper records each rank's view of the process group, so
the test fails if only one process ran. LoRA dropout is 0: with dropout the ranks draw different
masks and two-process runs agree with one-process runs only statistically.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, short_caption_pairs
from safetensors.torch import load_file

CENTER_SIZES = {"mixed": 15, "xiangya": 40, "huaxi": 40}

# A rank that records what accelerate made of it. Like every script that calls SAVLT, it runs under
# `if __name__ == "__main__":` (worker processes import it; see docs/api.md).
PROBE = """
import json, os, sys
from pathlib import Path
from savlt.cli import main
if __name__ == "__main__":
    code = main(sys.argv[2:])
    from accelerate import PartialState
    state = PartialState()
    Path(sys.argv[1], f"rank{state.process_index}.json").write_text(json.dumps(
        {"num_processes": state.num_processes, "backend": state.backend, "world_size": os.environ.get("WORLD_SIZE")}))
    sys.exit(code)
"""


# A pretraining rank that records a digest of its trained tensors after every optimiser step.
PRETRAIN_PROBE = """
import hashlib, json, sys
from pathlib import Path
import torch
from accelerate import PartialState
from savlt.cli import main
digests = []
adamw_step = torch.optim.AdamW.step
def recorded(self, *args, **kwargs):
    out = adamw_step(self, *args, **kwargs)
    digest = hashlib.sha256()
    for group in self.param_groups:
        for param in group["params"]:
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    digests.append(digest.hexdigest())
    return out
if __name__ == "__main__":
    torch.optim.AdamW.step = recorded
    code = main(sys.argv[2:])
    Path(sys.argv[1], f"rank{PartialState().process_index}.json").write_text(json.dumps(digests))
    sys.exit(code)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_close(a, b, where: str = "metrics") -> None:
    """Same structure; numbers equal up to 1e-6 (a temperature, tens rather than a fraction, up to
    1e-5 of itself); nulls where the other has nulls."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        relative = 1e-5 if where.endswith("temperature") else 0
        assert math.isclose(a, b, rel_tol=relative, abs_tol=1e-6), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are exercised on Linux")
@pytest.mark.slow
def test_two_processes_match_one(synth_root: Path, tmp_path: Path) -> None:
    settings = [f"data.root={synth_root}", f"data.cache_dir={tmp_path / 'cache'}", *FAST, "peft.dropout=0"]
    train_args = ["train", "-q", *(arg for s in settings for arg in ("--set", s))]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    one = subprocess.run(
        [sys.executable, "-m", "savlt.cli", *train_args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    (tmp_path / "ranks").mkdir()
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(probe), str(tmp_path / "ranks"), *train_args, "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    two = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["num_processes"] == 2 and r["world_size"] == "2" and r["backend"] == "gloo" for r in ranks)

    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["complete"] is True and m2["complete"] is True
    assert {c: v["n"] for c, v in m2["centers"].items()} == CENTER_SIZES  # every scan scored exactly once
    assert_close(m1, m2)

    a1 = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    a2 = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    assert set(a1) == set(a2)
    for name in a1:
        assert a1[name].shape == a2[name].shape
        assert (a1[name] - a2[name]).abs().max().item() < 1e-4, name
    trained = max(a1[n].abs().max().item() for n in a1 if "lora_B" in n)  # zero at initialisation
    assert trained > 5e-4  # the tolerance above is small against what training moved

    h1 = [json.loads(line) for line in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [1, 2, 3, 4]
    for x, y in zip(h1, h2, strict=True):  # the same loss trajectory
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are exercised on Linux")
@pytest.mark.slow
def test_two_pretraining_processes_train_one_model(synth_root: Path, tmp_path: Path) -> None:
    pairs = short_caption_pairs(synth_root, tmp_path)
    settings = [
        "pretrain.max_steps=3",
        "pretrain.batch_size=8",
        "pretrain.grad_accum=2",  # gradients exchanged on the last micro-batch of each step only
        "pretrain.adapters=lora",
        "pretrain.val_fraction=0.25",
        "data.num_workers=0",
    ]
    probe = tmp_path / "probe.py"
    probe.write_text(PRETRAIN_PROBE)
    (tmp_path / "ranks").mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(probe), str(tmp_path / "ranks"),
        "pretrain", str(pairs), "--model", "tiny", "--out", str(tmp_path / "pt"), "-q",
        *(arg for s in settings for arg in ("--set", s)),
    ]  # fmt: skip
    two = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{i}.json").read_text()) for i in range(2)]
    assert len(ranks[0]) == 3 and ranks[0] == ranks[1]  # the gradients are shared: one model, not two


def test_only_rank_zero_logs_progress_to_the_console() -> None:
    import io
    import logging

    from savlt.cli import console_handler

    def shown(rank: str, level: int) -> str:
        handler = console_handler(logging.INFO, rank)
        handler.setStream(io.StringIO())
        logger = logging.getLogger(f"savlt.test-rank-{rank}")
        logger.propagate = False
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.log(level, "message")
        logger.removeHandler(handler)
        return handler.stream.getvalue()

    assert shown("0", logging.INFO) == "INFO savlt.test-rank-0: message\n"
    assert shown("1", logging.INFO) == ""
    assert shown("1", logging.WARNING) == "[rank 1] WARNING savlt.test-rank-1: message\n"
