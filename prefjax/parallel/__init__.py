"""Meshes, regex partition rules and multi-host initialisation.

Typical use::

  mesh = parallel.mesh_from_config(config.mesh)            # axes data/fsdp/tensor
  with jax.set_mesh(mesh):
    model = build_model(...)
    param_shardings = parallel.shard_model(model, mesh, decoder.PARTITION_RULES)
  batch = parallel.shard_batch(batch, mesh)                # leading dim over data+fsdp

For models too large for one device, ``init_sharded(model_fn, mesh, rules)``
creates the parameters directly in their sharded layout.
"""

from prefjax.parallel.distributed import (
    ProcessInfo,
    define_flags,
    detect_cluster,
    every_process,
    gather_json,
    highest_in_any_process,
    in_any_process,
    in_every_process,
    initialize_distributed,
    process_info,
    sum_over_processes,
)
from prefjax.parallel.mesh import (
    BATCH_AXES,
    ENSEMBLE_AXIS,
    MESH_AXES,
    axis_size,
    data_shard,
    data_shards,
    first_holder_of_data_shard,
    local_batch_multiple,
    make_mesh,
    mesh_from_config,
    resolve_shape,
    summed_counts,
)
from prefjax.parallel.rules import (
    Rules,
    batch_sharding,
    check_joinable_across_processes,
    describe_shardings,
    gather_rows,
    init_sharded,
    jit_sharded,
    local_rows,
    match_partition_specs,
    named_shardings,
    path_str,
    shard_batch,
    shard_model,
    shard_tree,
)

__all__ = [
    "BATCH_AXES", "ENSEMBLE_AXIS", "MESH_AXES", "ProcessInfo", "Rules", "axis_size",
    "batch_sharding", "check_joinable_across_processes", "data_shard", "data_shards",
    "define_flags", "describe_shardings", "detect_cluster", "every_process",
    "first_holder_of_data_shard", "gather_json", "gather_rows", "highest_in_any_process",
    "in_any_process", "in_every_process", "init_sharded", "initialize_distributed",
    "jit_sharded", "local_batch_multiple", "local_rows", "make_mesh", "match_partition_specs",
    "mesh_from_config", "named_shardings", "path_str", "process_info", "resolve_shape",
    "shard_batch", "shard_model", "shard_tree", "sum_over_processes", "summed_counts",
]
