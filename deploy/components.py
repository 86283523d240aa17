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


def _explicit(profile: Profile, **given) -> Profile:
    """Profile values, overridden by the arguments actually given (None = not given)."""
    # The torchx CLI hands Optional[int] over as str; coerce here so both entry paths agree.
    ints = {"cpu", "gpu", "memMB", "metrics_port", "max_retries", "max_restarts"}
    for key, value in given.items():
        if value is None:
            continue
        if key == "env":
            value = {**profile.env, **value}  # merge: a profile's NCCL vars survive `--env FOO=1`
        elif key in ints:
            value = int(value)
        setattr(profile, key, value)
    # An explicit cpu/gpu/memMB means "not the profile's named host type".
    if given.get("h") is None and any(given.get(k) is not None for k in ("cpu", "gpu", "memMB")):
        profile.h = None
    profile.validate(f"profile {profile.name} + arguments")
    return profile


def _metrics_overrides(p: Profile) -> List[str]:
    if p.metrics_port <= 0:
        return ["--metrics.enabled=false"]
    return ["--metrics.enabled=true", f"--metrics.base_port={p.metrics_port}", f"--metrics.host={p.metrics_host}"]


def _add_max_restarts(role: specs.Role, max_restarts: int) -> None:
    # dist.ddp has no --max-restarts parameter; it builds `bash -c "torchrun ..."`, so insert it there.
    flag, cmd = role.args
    if flag != "-c" or not cmd.startswith("torchrun "):
        raise RuntimeError(f"unexpected dist.ddp command layout (torchx upgrade?): {role.args!r}")
    role.args = [flag, cmd.replace("torchrun ", f"torchrun --max-restarts {max_restarts} ", 1)]


def train(
    *overrides: str,
    profile: str = "demo-cpu",
    j: Optional[str] = None,
    image: Optional[str] = None,
    h: Optional[str] = None,
    cpu: Optional[int] = None,
    gpu: Optional[int] = None,
    memMB: Optional[int] = None,
    env: Optional[Dict[str, str]] = None,
    config: Optional[str] = None,
    metrics_port: Optional[int] = None,
    max_retries: Optional[int] = None,
    max_restarts: Optional[int] = None,
    mounts: Optional[List[str]] = None,
    name: Optional[str] = None,
) -> specs.AppDef:
    """
    Distributed tailrec training (``python -m trainer train``) under torchrun, from a named profile.

    Defaults come from the profile in torchx.yaml; every argument given explicitly overrides the
    profile's value (env is merged key by key). Rank r serves Prometheus metrics on
    metrics_port + local rank, exposed as ports ``metrics-<i>``.

    Args:
        overrides: trainer config overrides ``--section.field=value`` (after ``--``), applied last
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
        name=name or f"tailrec/{p.name}",
        h=p.h,
        cpu=p.cpu,
        gpu=p.gpu,
        memMB=p.memMB,
        j=p.j,
        env={**p.env, "TAILREC_PROFILE": p.name},
        max_retries=p.max_retries,
        rdzv_port=p.rdzv_port,
        # ddp wants flat `key=value` options; profiles write one mount per string (docker style)
        mounts=[opt for mount in p.mounts for opt in mount.split(",")] or None,
    )
    role = app.roles[0]
    _add_max_restarts(role, p.max_restarts)
    if p.metrics_port > 0:
        role.port_map.update({f"metrics-{i}": p.metrics_port + i for i in range(p.nproc_per_node)})
    return app
