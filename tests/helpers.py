"""Helpers of the process-level tests: run the trainer as a real process, read what it leaves behind."""
import os, shutil, subprocess, sys, tempfile
from pathlib import Path

import torch

BIN = Path(sys.executable).parent
DECLIP_TRAIN = str(BIN / 'declip-train') if (BIN / 'declip-train').exists() else shutil.which('declip-train')
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']


def cpu_env(threads=1, **extra):
    "The environment of a child process: CPU only, a fixed thread count (bitwise-reproducible runs), no tqdm."
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES='',
               PYTHONUNBUFFERED='1', **{k: str(v) for k, v in extra.items()})
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    return env


def flag(v):
    "A train() value as a declip-train flag value (booleans are true/false)."
    return str(v).lower() if isinstance(v, bool) else str(v)


def train_args(prog=None, **params):
    "argv of a declip-train run; tiny defaults: no evaluation, no workers, no progress bar."
    params = dict(dict(eval_data='', workers=0, progress=False), **params)
    return [prog or DECLIP_TRAIN] + [x for k, v in params.items() for x in (f'--{k}', flag(v))]


def run_ok(cmd, env=None, timeout=120):
    "Run `cmd` to completion and fail with its stderr when it does not exit 0."
    p = subprocess.run([str(c) for c in cmd], env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\nexit {p.returncode}\n{p.stderr[-4000:]}"
    return p


def load_ckpt(path):
    "A checkpoint loaded the safe way (weights_only: a checkpoint must never need to run code), its packed optimiser rows restored."
    from declip.runs import load_checkpoint_file
    return load_checkpoint_file(path)
