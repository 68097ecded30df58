"""Connecting to Ray: an embedded local instance by default, a cluster with ``ray.address``/RAY_ADDRESS."""

from __future__ import annotations

import logging
import os
import socket
import time

from dilm_ray import interrupts
from dilm_ray.config import Config
from dilm_ray.errors import UserError, first_line

# The Train controller polls workers every 2 s by default, which makes each report() block ~2 s.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "TOKENIZERS_PARALLELISM": "false"}
# transformers' and the hub's per-load bars ("Loading weights", "Writing model shards") and MLflow's
# INFO lines (creating its tables, an experiment) say nothing a user acts on; the CLI sets these
# before transformers and mlflow are imported (a user's own value wins)
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_LOGGING_LEVEL": "WARNING"}


CONNECT_TIMEOUT_S = 5.0  # for probing an asked-for cluster; unprobed, Ray itself retries for minutes
RAY_CLIENT_PORT = 10001  # Ray Client's default (``ray://host`` without a port)
# An HTTP/2 client's first bytes (connection preface + empty SETTINGS frame): a gRPC server (Ray's
# GCS, Ray Client's server) answers with a SETTINGS frame (frame type 4, the 4th byte)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def asked_address(cfg: Config) -> tuple[str, str] | None:
    """``(key, address)`` of the cluster the user asked for: ``ray.address``, else the
    ``RAY_ADDRESS`` environment variable (``ray job submit`` sets it for the job); None when
    neither is set or the address is ``local``, which means an embedded Ray of our own."""
    for key, address in (("ray.address", cfg.ray.address), ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))):
        if address:
            return None if address == "local" else (key, address)
    return None


def probe_target(address: str) -> tuple[str, int] | None:
    """The ``(host, port)`` that ``ray.init(address)`` would connect to, or None when it cannot
    be told (another ``scheme://``, no port). ``host:port`` and ``auto`` go through Ray's own
    ``services.canonicalize_bootstrap_address`` (``auto``: the cluster ``ray start`` recorded on
    this machine; ``127.0.0.1``: the machine's own address); ``ray://host[:port]`` (Ray Client)
    is its client server, port 10001 by default. Raises ``ValueError`` for a malformed address
    and ``ConnectionError`` for ``auto`` with no cluster recorded."""
    from urllib.parse import urlsplit

    if "://" in address:
        parts = urlsplit(address)
        port = parts.port or (RAY_CLIENT_PORT if parts.scheme == "ray" else None)
        return (parts.hostname, port) if parts.hostname and port else None
    from ray._private import services

    target = services.canonicalize_bootstrap_address(address)
    if target is None:
        return None
    host, _, port = target.rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def grpc_answers(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S, tls: bool = False) -> str | None:
    """None when a gRPC server answers at ``host:port`` within ``timeout_s`` seconds in all,
    else why not (one line). Without ``tls`` the HTTP/2 greeting is exchanged, so that a port
    that accepts connections but is not Ray's (the dashboard's, another service) is told apart;
    with it (Ray's ``RAY_USE_TLS``) only the TCP connection is made.

    Not ``grpc.channel_ready_future``: its channel keeps reconnecting until the timeout, so a
    closed port (the common mistake) costs the whole ``timeout_s`` and the reason is lost, where
    this answers "Connection refused" at once."""
    deadline = time.monotonic() + timeout_s
    head = b""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            if tls:
                return None
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.sendall(H2_PREFACE)
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return exc.strerror or first_line(exc)
    if len(head) == 9 and head[3] == 4:
        return None
    return "a server answers, but not Ray's (gRPC): the dashboard's port? a cluster address is the GCS port, 6379 by default"


def check_reachable(key: str, address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ``UserError`` naming ``key`` and ``address`` unless the Ray cluster there answers
    within ``timeout_s`` seconds (``probe_target``, ``grpc_answers``).

    Unprobed, an unreachable GCS makes ``ray.init`` retry for minutes (over 2 min measured with
    Ray 2.60, 127.0.0.1 at a closed port). An address whose target cannot be told (another
    ``scheme://``, no port) is left to Ray. A proxy or firewall that completes every connection
    and the HTTP/2 greeting itself passes the probe.
    """
    try:
        target = probe_target(address)
    except (ConnectionError, ValueError) as exc:  # ``auto`` with no cluster recorded; a malformed address
        raise UserError(f"{key} {address}: {first_line(exc)}") from None
    if target is None:
        return
    host, port = target
    why = grpc_answers(host, port, timeout_s, tls=os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"))
    if why is not None:
        shown = address if f"{host}:{port}" in address else f"{address} (Ray connects to {host}:{port})"
        raise UserError(f"{key} {shown}: no Ray cluster is reachable there ({why}); start one (ray start --head) or unset {key} to run on an embedded Ray")


def ensure_ray(cfg: Config) -> None:
    """``ray.init`` once per process, forwarding the environment the workers need.

    Without ``ray.address`` or ``RAY_ADDRESS`` (or with ``local``) this process starts an
    embedded Ray of its own (``address="local"``), never attaching to a cluster recorded on the
    machine (``ray_current_cluster`` in Ray's temp folder, which a bare ``ray.init()`` reads: a
    dead one there made commands hang for minutes). With an address (see ``asked_address``) it
    connects to that cluster only, after ``check_reachable``: an unreachable one raises
    ``UserError`` naming the key and the address within ``CONNECT_TIMEOUT_S`` seconds, and so
    does a ``ConnectionError`` from ``ray.init`` itself.

    Worker output is not forwarded to the terminal (``log_to_driver=False``): Train workers write
    their own log files and the driver draws their progress (``driver.progress``); evaluation
    tasks return what they measured. Forwarded, tqdm redraws and Ray's own worker chatter filled
    ``make run``'s terminal with hundreds of empty ``(RayTrainWorker pid=...)`` lines. Other
    workers' output stays in Ray's session logs (``/tmp/ray/session_*/logs``). For a Ray this process starts itself (no
    ``ray.address``), the note that token authentication is on by default is silenced: the
    token is generated locally and there is nothing to do about it.

    ``ray.init`` replaces the SIGTERM handler with ``sys.exit``; the command's own handler
    (``interrupts``) is put back so that SIGTERM still ends the command cleanly.
    """
    import ray

    if ray.is_initialized():
        return
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    asked = asked_address(cfg)
    if asked is None:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        address = "local"
    else:
        key, address = asked
        check_reachable(key, address)
    try:
        ray.init(address=address, runtime_env={"env_vars": worker_env(cfg)}, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as exc:
        if asked is None:
            raise
        raise UserError(f"{asked[0]} {address}: {first_line(exc)}") from None
    finally:
        interrupts.reinstall()


def worker_env(cfg: Config) -> dict[str, str]:
    """The environment every Ray worker of this run gets: ``TRAIN_ENV``, the hub, cache and MLflow
    settings set here, and ``OMP_NUM_THREADS=threads`` when the config sets ``threads`` (and the
    environment does not already).

    Why the thread count: Ray starts a worker that holds 1 CPU with ``OMP_NUM_THREADS=1``, and
    raising torch's threads afterwards (``setup_torch``) does not undo all of it. Measured here
    (``benchmarks/ray_overhead.py``, SmolLM2 stage-1 step in bf16, 2 threads): 1.43 s per step
    in a 1-worker Ray Train run with Ray's value, 1.23 s with ``OMP_NUM_THREADS=2``, 0.96-1.06 s
    in-process. Evaluation tasks still set their own thread count from the CPUs they hold.
    """
    keys = (*TRAIN_ENV, *QUIET_ENV, "HF_HUB_OFFLINE", "DILM_RAY_CACHE", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS")
    env = {**TRAIN_ENV, **QUIET_ENV, **{k: os.environ[k] for k in keys if k in os.environ}}
    if cfg.threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    return env
