"""DistributedDataParallel over an AdaptedModel: `torchrun --nproc_per_node=2` on CPU (gloo), each rank on
its own data; after a few steps both ranks hold identical adapter weights, changed from the start, and
an unchanged base model. This file is also the worker script torchrun runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two processes train together (torch.distributed)

STEPS = 3


def _worker(out_file: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import fxadapt

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = fxadapt.adapt("builtin:tiny-bert-seqcls")
    model.add_adapter("a", "lora[r=4,alpha=8]")
    model.train_adapter("a")
    torch.manual_seed(rank)  # different adapter init per rank: DDP must broadcast rank 0's
    with torch.no_grad():
        for module in model.adapter_modules("a"):
            module.lora_B.normal_()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    for _ in range(STEPS):
        ids = torch.randint(1, 100, (4, 8), generator=gen)
        loss = ddp(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, 3, (4,), generator=gen))
        loss.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if p.requires_grad])
    gathered = [torch.zeros_like(trained) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, trained)
    if rank == 0:
        frozen_same = all(torch.equal(p, start[n]) for n, p in model.named_parameters() if not p.requires_grad)
        report = {"ranks": len(gathered), "max_diff": (gathered[0] - gathered[1]).abs().max().item(),
                  "moved": (gathered[0] - torch.cat([start[n].flatten() for n, p in model.named_parameters()
                                                     if p.requires_grad])).abs().max().item(),
                  "frozen_unchanged": frozen_same, "trainable": sum(p.requires_grad for p in model.parameters())}
        Path(out_file).write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX only")
def test_two_process_ddp_keeps_adapters_identical(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": str(Path(__file__).parent)}
    # --standalone: a local rendezvous on a free port. Own session, so a hang is killed with its workers.
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", __file__, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ranks"] == 2
    assert report["max_diff"] == 0.0  # identical adapter (and head) weights on both ranks
    assert report["moved"] > 0.0
    assert report["frozen_unchanged"]
    assert report["trainable"] == 8 + 2  # LoRA A and B at q and v in 2 layers, plus the classifier


if __name__ == "__main__":
    _worker(sys.argv[1])
