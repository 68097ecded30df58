"""Start-up checks: what every command that runs stages verifies before its first stage.

Each failure is a ``UserError`` naming the key to change (one line, exit status 2), raised
before anything is written: not minutes of retries against an unreachable server, and not a
run whose records land in a different file on each node of a cluster.
"""

from __future__ import annotations

from pathlib import Path

from dilm_ray.config import Config
from dilm_ray.driver.ray_env import asked_address, ensure_ray
from dilm_ray.driver.ray_train import is_uri
from dilm_ray.errors import UserError
from dilm_ray.tracking.mlflow_store import check_tracking_server, file_backed, tracking_source, tracking_uri


def startup_checks(cfg: Config) -> None:
    """In order, each raising ``UserError``:

    1. an ``http(s)://`` tracking server answers within seconds (``check_tracking_server``);
    2. with ``ray.address`` or ``RAY_ADDRESS``, the cluster is reachable, and this process
       connects to it now (``ensure_ray``); without one nothing starts here: the embedded Ray
       a stage starts later is this machine alone;
    3. on a connected cluster whose work runs on other nodes (``cluster_checks``), every path a
       process on another node writes to or reads from is one they all share.
    """
    check_tracking_server(cfg)
    if asked_address(cfg) is None:
        return
    import ray

    ensure_ray(cfg)
    try:
        here = ray.get_runtime_context().get_node_id()
    except Exception:  # Ray Client has no node of its own: the node count decides
        here = None
    cluster_checks(cfg, ray.nodes(), here)


def spread_reason(nodes: list[dict], here: str | None) -> str | None:
    """Why work on a cluster (``nodes`` as ``ray.nodes()`` lists them, ``here`` the driver's node
    id) runs on nodes other than the driver's, or None when it all runs here: more than one
    live node, or a driver's node without CPUs (a head started with ``--num-cpus=0``, whose
    workers an autoscaler adds later, as in ``clusters/*.yaml``)."""
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return f"the connected Ray cluster has {len(alive)} live nodes"
    mine = next((n for n in alive if n.get("NodeID") == here), None)
    if mine is not None and not mine.get("Resources", {}).get("CPU"):
        return "this node of the connected Ray cluster has no CPUs, so its work runs on other nodes"
    return None


def cluster_checks(cfg: Config, nodes: list[dict], here: str | None) -> None:
    """When work runs on other nodes than this driver's (``spread_reason``), refuse
    (``UserError`` naming the key) what would be a different place on each node: a file-backed
    tracking store (``sqlite:``, ``file:`` or a path: the rank-0 Train worker and evaluation
    tasks log wherever they run), a relative ``output_dir`` (workers write the run folder;
    under ``ray job submit`` the driver's working folder is a temporary copy) and a relative
    local ``ray.storage_path``. A single node with CPUs: nothing to check.
    """
    why = spread_reason(nodes, here)
    if why is None:
        return
    if cfg.tracking.enabled and file_backed(uri := tracking_uri(cfg)):
        raise UserError(
            f"{tracking_source(cfg)} {uri}: a file-backed MLflow store is a different file on each node, and {why}; "
            "start an MLflow server on the head node and set tracking.uri=http://<head>:5000 (clusters/README.md)"
        )
    if not Path(cfg.given_output_dir).expanduser().is_absolute():  # ``output_dir`` itself is resolved on this node
        raise UserError(
            f"output_dir {cfg.given_output_dir}: a relative path is a different folder on each node, and {why}; "
            "set an absolute path on storage every node mounts (NFS)"
        )
    storage = cfg.ray.storage_path
    if storage and not is_uri(storage) and not Path(storage).expanduser().is_absolute():
        raise UserError(
            f"ray.storage_path {storage}: a relative path is a different folder on each node, and {why}; "
            "use s3://, gs:// or an absolute path every node mounts"
        )
