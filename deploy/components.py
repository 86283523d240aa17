"""TorchX components for tailrec.

Run by path from the repository root, or by name once the project is installed (entry point
``torchx.components: tailrec = deploy.components``)::

    torchx run -s local_cwd deploy/components.py:train --profile demo-cpu -- --train.max_steps=20
    torchx run -s kubernetes tailrec.train --profile criteo-2x8gpu --image REGISTRY/tailrec:0.1.0

No ``from __future__ import annotations`` here: TorchX builds the CLI from the real annotations.
"""
import os
import sys
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

try:
    from deploy.profiles import Profile, get_profile
except ModuleNotFoundError:
    # `torchx run deploy/components.py:train` execs this file without its package on sys.path
    # (and without __file__); it is run from the repository root, so use the working directory.
    sys.path.insert(0, os.getcwd())
    from deploy.profiles import Profile, get_profile
from trainer.launch import TRAINER_MODULE, trainer_args


# "Not given" for each parameter: the profile's value is used. Plain int/str defaults (not Optional[...])
# so that `torchx run ... --help` shows the real types (torchx 0.7 renders any Optional as `str`).
UNSET_INT = -1
UNSET_STR = ""


def _given(value) -> bool:
    return value is not None and value != UNSET_INT and value != UNSET_STR


def _explicit(profile: Profile, **given) -> Profile:
    """Profile values, overridden by the arguments actually given."""
    for key, value in given.items():
        if not _given(value):
            continue
        if key == "env":
            value = {**profile.env, **value}  # merge: a profile's NCCL vars survive `--env FOO=1`
        setattr(profile, key, value)
    # An explicit cpu/gpu/memMB means "not the profile's named host type".
    if not _given(given.get("h")) and any(_given(given.get(k)) for k in ("cpu", "gpu", "memMB")):
        profile.h = None
    profile.validate(f"profile {profile.name} + arguments")
    return profile


def _metrics_overrides(p: Profile) -> List[str]:
    if p.metrics_port <= 0:
        return ["--metrics.enabled=false"]
    return ["--metrics.enabled=true", f"--metrics.base_port={p.metrics_port}", f"--metrics.host={p.metrics_host}"]


# torchx 0.7's dist.ddp has no max_restarts parameter. torchrun reads every option it is not given on
# its command line from PET_<OPTION> (torch.distributed.argparse_util.env), so the restarts travel in the
# role's environment instead of being edited into ddp's generated command.
MAX_RESTARTS_ENV = "PET_MAX_RESTARTS"


def train(
    *overrides: str,
    profile: str = "demo-cpu",
    j: str = UNSET_STR,
    image: str = UNSET_STR,
    h: str = UNSET_STR,
    cpu: int = UNSET_INT,
    gpu: int = UNSET_INT,
    memMB: int = UNSET_INT,
    env: Optional[Dict[str, str]] = None,
    config: str = UNSET_STR,
    metrics_port: int = UNSET_INT,
    max_retries: int = UNSET_INT,
    max_restarts: int = UNSET_INT,
    mounts: Optional[List[str]] = None,
    name: str = UNSET_STR,
) -> specs.AppDef:
    """
    Distributed tailrec training (``python -m trainer train``) under torchrun, from a named profile.

    Defaults come from the profile in torchx.yaml; every argument given explicitly overrides the
    profile's value (env is merged key by key). -1 / empty = "use the profile's value". The trailing
    overrides are optional (torchx 0.7's help prints "(required)" for any trailing argument list). Rank r serves Prometheus metrics on
    metrics_port + local rank, exposed as ports ``metrics-<i>``.

    Args:
        overrides: optional trainer config overrides ``--section.field=value`` (after ``--``), applied last
        profile: named profile in torchx.yaml (demo-cpu, ml1m-1x8gpu, criteo-2x8gpu, ...)
        j: [{min_nnodes}:]{nnodes}x{nproc_per_node}, e.g. 1x2 or 2x8
        image: container image (e.g. tailrec:0.1); ignored by local_cwd
        h: a registered named resource (e.g. aws_p4d.24xlarge); takes precedence over cpu/gpu/memMB
        cpu: number of cpus per node (replica)
        gpu: number of gpus per node (replica)
        memMB: cpu memory in MB per node (replica)
        env: extra environment variables (e.g. ENV1=v1,ENV2=v2), merged over the profile's
        config: trainer YAML config path, relative to the working directory / image WORKDIR
        metrics_port: Prometheus base port (rank r serves base + local rank); 0 disables metrics
        max_retries: scheduler retries of the whole job
        max_restarts: torchrun --max-restarts (elastic restarts from the latest checkpoint)
        mounts: mounts for container schedulers (ex. type=bind,src=/data,dst=/data[,readonly])
        name: job name {experimentname}/{runname}; default tailrec/<profile>
    """
    p = _explicit(get_profile(profile), j=j, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
                  config=config, metrics_port=metrics_port, max_retries=max_retries,
                  max_restarts=max_restarts, mounts=mounts)
    app = ddp(
        *trainer_args("train", p.config, [*p.overrides, *_metrics_overrides(p), *overrides]),
        m=TRAINER_MODULE,
        image=p.image,
        name=name if _given(name) else f"tailrec/{p.name}",
        h=p.h,
        cpu=p.cpu,
        gpu=p.gpu,
        memMB=p.memMB,
        j=p.j,
        # ddp sets LOGLEVEL=WARNING for torchrun's agent; the trainer reads its own level first
        env={"TAILREC_LOG_LEVEL": "INFO", **p.env, "TAILREC_PROFILE": p.name, MAX_RESTARTS_ENV: str(p.max_restarts)},
        max_retries=p.max_retries,
        rdzv_port=p.rdzv_port,
        # ddp wants flat `key=value` options; profiles write one mount per string (docker style)
        mounts=[opt for mount in p.mounts for opt in mount.split(",")] or None,
    )
    role = app.roles[0]
    if p.metrics_port > 0:
        role.port_map.update({f"metrics-{i}": p.metrics_port + i for i in range(p.nproc_per_node)})
    return app
