"""Whether a stage's workers fit the Ray cluster, checked before the stage starts.

Ray retries an unplaceable worker group without end (a stage asking 2 x 1 CPU of a 1-CPU Ray hangs with
pages of retries). The stage's bundles (its minimum worker count, each `cpus_per_worker` CPUs and a GPU
when it uses GPUs) are packed onto the nodes' total resources, each bundle on one node:
- they fit: go;
- a fixed cluster where they do not: an error naming the scaling keys and what the cluster has;
- an autoscaling cluster whose autoscaler published its node types (what Ray Train reads): if the node
  types at their maximum counts could hold them, ask the autoscaler for them and wait, saying what is
  pending, at most `ray.resource_wait_s`; otherwise the same error, naming the node types;
- Ray's own autoscaler (`ray up`, KubeRay's), which publishes a status but not its node types: ask it
  and wait the same way; the error comes when the wait runs out. (Every head runs that monitor; one
  without an autoscaling config cannot add nodes and counts as fixed: `can_add_nodes`.)
"""

from __future__ import annotations

import json
import logging
import time

from lmfleet.errors import UserError

log = logging.getLogger("lmfleet")


def _fits(bundles: list[dict], nodes: list[dict]) -> bool:
    """First-fit decreasing: every bundle on one node, within the nodes' resources."""
    free = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: sorted(b.items()), reverse=True):
        for node in free:
            if all(node.get(k, 0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0) - v
                break
        else:
            return False
    return True


def _show(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) + "}"


def cluster_nodes() -> list[dict]:
    """The total CPU / GPU of each live node."""
    import ray

    return [{k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")} for n in ray.nodes() if n["Alive"]]


def node_types() -> list[dict] | None:
    """The node types an autoscaler published ({name, resources, max}; max -1: unbounded), as Ray Train reads
    them; None where none were published (a fixed cluster, or Ray's own autoscaler: see `autoscaler_status`)."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return [{"name": g.name, "resources": {k: v for k, v in g.resources.items() if k in ("CPU", "GPU")},
             "max": g.max_count} for g in config.node_group_configs]


def autoscaler_status() -> dict | None:
    """The status Ray's own autoscaler (the `ray up` / `ray start --autoscaling-config` monitor) publishes
    every few seconds, None without one. It does not publish its node types, so whether a request can be
    met is only known by asking and waiting."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else None


def can_add_nodes(status: dict | None) -> bool:
    """Whether the autoscaler of `status` can launch nodes. Every Ray head runs the monitor; without an
    autoscaling config (a local `ray.init`, a plain `ray start` cluster) it drives a read-only provider that
    names each node's type after the node itself (`node_<id>`) and never adds one."""
    mapping = ((status or {}).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def _pending(status: dict | None) -> str:
    """What the autoscaler is launching, from its status: "2 x cpu_worker"."""
    report = (status or {}).get("autoscaler_report") or {}
    launches = dict(report.get("pending_launches") or {})
    for node in report.get("pending_nodes") or []:  # (ip, node type, status)
        launches[node[1]] = launches.get(node[1], 0) + 1
    return ", ".join(f"{n} x {kind}" for kind, n in launches.items()) or "none yet"


def demand(scaling, extra: list[dict] = ()) -> tuple[list[dict], bool]:
    """(bundles of the stage's minimum worker group and its `extra` actors, whether it uses GPUs) for a
    `scaling` block."""
    use_gpu = scaling.resolve_gpu()
    bundle = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return [dict(bundle) for _ in range(scaling.bounds[0])] + [dict(b) for b in extra], use_gpu


def ensure(key: str, scaling, wait_s: float, embedded: bool, extra: list[dict] = ()) -> None:
    """Return once the stage's workers (and `extra` bundles: its own actors) fit the cluster; UserError if they
    never can (or the wait ran out). `key`: the stage's config key (stages.NAME); `embedded`: lmfleet started
    this Ray (ray.num_cpus sizes it)."""
    bundles, use_gpu = demand(scaling, extra)
    nodes = cluster_nodes()
    if _fits(bundles, nodes):
        return
    types = node_types()
    workers = scaling.bounds[0]
    want = f"{workers} worker(s) x {_show(bundles[0])}" + "".join(f" + an actor of {_show(b)}" for b in extra)
    have = ", ".join(_show(n) for n in nodes) or "no nodes"
    if types is None and can_add_nodes(autoscaler_status()):
        return _wait_for_autoscaler(key, bundles, want, wait_s)
    if types is not None:
        # Each type at its maximum count (unbounded: as many as there are bundles), next to the live nodes.
        possible = nodes + [t["resources"] for t in types for _ in range(len(bundles) if t["max"] < 0 else t["max"])]
        if _fits(bundles, possible):
            return _wait_for_autoscaler(key, bundles, want, wait_s)
        kinds = "; ".join(f"{t['name']}: {_show(t['resources'])} x {t['max']}" for t in types)
        have += f"; its autoscaler's node types: {kinds}"
    hint = "ray.num_cpus (the local Ray lmfleet starts)" if embedded else "a cluster with bigger or more nodes"
    gpu = (f"{key}.scaling.use_gpu is {scaling.use_gpu} but no node has a GPU; "
           if use_gpu and not any(n.get("GPU") for n in nodes + [t["resources"] for t in types or []]) else "")
    raise UserError(f"{key}.scaling: {gpu}{want} cannot be placed on this Ray cluster (nodes: {have}); lower "
                    f"{key}.scaling.num_workers / cpus_per_worker / use_gpu, or raise {hint}")


def _wait_for_autoscaler(key: str, bundles: list[dict], want: str, wait_s: float) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    deadline = time.monotonic() + wait_s
    try:
        while not _fits(bundles, nodes := cluster_nodes()):
            if time.monotonic() > deadline:
                raise UserError(f"{key}.scaling: {want} still pending after {wait_s:g} s: the autoscaler has not "
                                f"provided them (nodes now: {', '.join(_show(n) for n in nodes)}); raise "
                                "ray.resource_wait_s or check the cluster's node types and quotas")
            log.info("%s: waiting for the autoscaler: %s pending; nodes now: %s; launching: %s", key, want,
                     ", ".join(_show(n) for n in nodes), _pending(autoscaler_status()))
            time.sleep(5)
    finally:
        request_resources(bundles=[])  # the stage's own placement group keeps the nodes from here on
