"""Tests for prefjax.parallel: meshes, partition rules, sharded == unsharded, distributed init."""

from __future__ import annotations

import dataclasses
import importlib
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from prefjax import experiment
from prefjax import parallel
from prefjax.parallel import distributed
from tests import comparisons

# --------------------------------------------------------------------------
# A small MLP whose parameters shard over fsdp and tensor.
# --------------------------------------------------------------------------

D_IN, D_HID, D_OUT, BATCH = 8, 16, 4, 16

RULES = [
    (r"embed/kernel", P("tensor", "fsdp")),
    (r"mlp/up/kernel", P("fsdp", "tensor")),
    (r"mlp/up/bias", P("tensor")),
    (r"mlp/down/kernel", P("tensor", "fsdp")),
    (r"kernel", P("fsdp")),  # everything else with a kernel: rows over fsdp
]

# What the rules ask for, written out by hand (the test must not re-derive it).
EXPECTED_SPECS = {
    "embed/kernel": P("tensor", "fsdp"),
    "layers/0/mlp/up/kernel": P("fsdp", "tensor"),
    "layers/0/mlp/up/bias": P("tensor"),
    "layers/0/mlp/down/kernel": P("tensor", "fsdp"),
    "layers/0/mlp/down/bias": P(),
    "layers/1/mlp/up/kernel": P("fsdp", "tensor"),
    "layers/1/mlp/up/bias": P("tensor"),
    "layers/1/mlp/down/kernel": P("tensor", "fsdp"),
    "layers/1/mlp/down/bias": P(),
    "head/kernel": P("fsdp"),
}


def _init_params(seed=0):
  rng = np.random.default_rng(seed)
  dense = lambda i, o: {"kernel": rng.normal(0, i ** -0.5, (i, o)).astype(np.float32),
                        "bias": rng.normal(0, 0.1, (o,)).astype(np.float32)}
  return {
      "embed": {"kernel": rng.normal(0, 0.3, (D_IN, D_HID)).astype(np.float32)},
      "layers": [{"mlp": {"up": dense(D_HID, D_HID), "down": dense(D_HID, D_HID)}}
                 for _ in range(2)],
      "head": {"kernel": rng.normal(0, 0.25, (D_HID, D_OUT)).astype(np.float32)},
  }


def _forward(params, x):
  h = x @ params["embed"]["kernel"]
  for layer in params["layers"]:
    up, down = layer["mlp"]["up"], layer["mlp"]["down"]
    h = h + jax.nn.gelu(h @ up["kernel"] + up["bias"]) @ down["kernel"] + down["bias"]
  return h @ params["head"]["kernel"]


def _loss(params, batch):
  logits = _forward(params, batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


LEARNING_RATE = 1e-2
OPT = optax.adamw(LEARNING_RATE, weight_decay=0.1)


def _train_step(params, opt_state, batch):
  loss, grads = jax.value_and_grad(_loss)(params, batch)
  updates, opt_state = OPT.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, grads


def _batch(seed=1):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(BATCH, D_IN)).astype(np.float32),
          "y": rng.integers(0, D_OUT, BATCH).astype(np.int32)}


@pytest.fixture(scope="module")
def reference_step():
  """Two optimizer steps on one device."""
  cpu0 = jax.devices()[0]
  params = jax.device_put(_init_params(), cpu0)
  opt_state = OPT.init(params)
  step = jax.jit(_train_step)
  out = []
  for seed in (1, 2):
    params, opt_state, loss, grads = step(params, opt_state, jax.device_put(_batch(seed), cpu0))
    out.append((params, loss, grads))
  return out


def _flat(tree):
  return {parallel.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_train_step_matches_single_device(shape, reference_step):
  mesh = parallel.make_mesh(shape, parallel.MESH_AXES)
  with jax.set_mesh(mesh):
    params = _init_params()
    param_sh = parallel.named_shardings(mesh, RULES, params, strict=True)
    params = parallel.shard_tree(params, param_sh)
    opt_state = jax.eval_shape(OPT.init, params)
    opt_sh = parallel.named_shardings(mesh, RULES, opt_state, strict=True)
    opt_state = jax.jit(OPT.init, out_shardings=opt_sh)(params)
    batch_sh = jax.tree.map(lambda x: parallel.batch_sharding(mesh, x.ndim), _batch())
    replicated = NamedSharding(mesh, P())
    step = parallel.jit_sharded(
        _train_step, in_shardings=(param_sh, opt_sh, batch_sh),
        out_shardings=(param_sh, opt_sh, replicated, param_sh), donate_argnums=(0, 1))
    for steps, (ref_params, ref_loss, ref_grads) in enumerate(reference_step, start=1):
      params, opt_state, loss, grads = step(params, opt_state,
                                            parallel.shard_batch(_batch(steps), mesh))
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
      got, want = _flat(grads), _flat(ref_grads)
      for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{shape} {name}")
      # Adam's step is ≈ lr·sign(g): ill-conditioned where a gradient is near 0.
      comparisons.assert_params_close_after_adam(params, ref_params,
                                                 learning_rate=LEARNING_RATE, steps=steps)
  specs = {k: v.sharding.spec for k, v in _flat(params).items()}
  assert specs == EXPECTED_SPECS
  # Adam moments follow the same rules through their longer paths.
  mu = _flat(opt_state)
  assert mu["0/mu/layers/1/mlp/up/kernel"].sharding.spec == P("fsdp", "tensor")
  assert mu["0/count"].sharding.spec == P()
  # The shards really are split: per-device shape of the up-projection kernel.
  up = _flat(params)["layers/0/mlp/up/kernel"]
  assert up.addressable_shards[0].data.shape == (D_HID // shape[1], D_HID // shape[2])


class _MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(D_IN, D_HID, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(D_HID, D_HID, rngs=rngs)
    self.down = nnx.Linear(D_HID, D_HID, rngs=rngs)
    self.head = nnx.Linear(D_HID, D_OUT, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    return self.head(h + self.down(jax.nn.gelu(self.up(h))))


NNX_RULES = [(r"^up/kernel", P("fsdp", "tensor")), (r"up/bias", P("tensor")),
             (r"down/kernel", P("tensor", "fsdp")), (r"kernel", P("fsdp"))]


def _nnx_step(model, optimizer, batch):
  def loss_fn(m):
    logits = m(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss, grads


def test_nnx_module_sharded_by_shard_model_matches_unsharded():
  ref_model = _MLP(nnx.Rngs(0))
  ref_opt = nnx.Optimizer(ref_model, optax.adam(1e-2), wrt=nnx.Param)
  ref_loss, ref_grads = nnx.jit(_nnx_step)(ref_model, ref_opt, _batch())

  mesh = parallel.make_mesh((2, 2, 2), parallel.MESH_AXES)
  with jax.set_mesh(mesh):
    model = _MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    shardings = parallel.shard_model(model, mesh, NNX_RULES, strict=True)
    parallel.shard_model(optimizer, mesh, NNX_RULES, strict=True)
    loss, grads = nnx.jit(_nnx_step)(model, optimizer, parallel.shard_batch(_batch(), mesh))

  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  comparisons.assert_params_close_after_adam(nnx.state(model, nnx.Param),
                                             nnx.state(ref_model, nnx.Param),
                                             learning_rate=1e-2, steps=1)
  for name, want in _flat(ref_grads).items():
    np.testing.assert_allclose(_flat(grads)[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
  assert model.up.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert model.up.bias[...].sharding.spec == P("tensor")
  assert model.down.kernel[...].sharding.spec == P("tensor", "fsdp")
  assert model.embed.kernel[...].sharding.spec == P("fsdp")
  assert _flat(shardings)["up/kernel"].spec == P("fsdp", "tensor")
  assert _flat(nnx.state(optimizer))["opt_state/0/mu/up/kernel"].sharding.spec == P(
      "fsdp", "tensor")
  text = parallel.describe_shardings(nnx.state(model))
  assert "up/kernel  (16, 16) float32  shard (8, 8)  P('fsdp', 'tensor')" in text
  # Per device: embed 8x16/2, up 16x16/4 + 16/2, down 16x16/4 + 16, head 16x4/2 floats.
  per_device = 4 * (64 + 64 + 8 + 64 + 16 + 32)
  assert text.splitlines()[-1] == (
      f"total: {8 * 16 + 2 * (16 * 16 + 16) + 16 * 4} elements, {per_device} B per device")


def test_init_sharded_builds_the_same_model_in_its_sharded_layout():
  mesh = parallel.make_mesh((1, 4, 2), parallel.MESH_AXES)
  model, shardings = parallel.init_sharded(lambda: _MLP(nnx.Rngs(0)), mesh, NNX_RULES,
                                           strict=True)
  reference = _MLP(nnx.Rngs(0))
  for name, want in _flat(nnx.state(reference)).items():
    np.testing.assert_array_equal(_flat(nnx.state(model))[name], want, err_msg=name)
  assert model.up.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert model.up.kernel[...].addressable_shards[0].data.shape == (D_HID // 4, D_HID // 2)
  assert model.head.kernel[...].sharding.spec == P("fsdp")
  assert _flat(shardings)["down/kernel"].spec == P("tensor", "fsdp")


# --------------------------------------------------------------------------
# Rule matching.
# --------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Holder:
  weights: jax.Array


def test_path_str_handles_every_key_kind():
  tree = {"layers": [{"attn": (np.zeros(2), _Holder(np.zeros(3)))}]}
  names = [parallel.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert names == ["layers/0/attn/0", "layers/0/attn/1/weights"]
  model = _MLP(nnx.Rngs(0))
  state_names = {parallel.path_str(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
  assert "up/kernel" in state_names and "embed/kernel" in state_names
  flat_names = {parallel.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model))}
  assert flat_names == state_names


def test_first_matching_rule_wins_and_unmatched_is_replicated():
  tree = {"attn": {"q_proj": {"kernel": np.zeros((4, 8))}}, "norm": {"scale": np.zeros(4)},
          "step": 3}
  rules = [(r"kernel", P("fsdp")), (r"q_proj/kernel", P("tensor", "fsdp"))]
  specs = parallel.match_partition_specs(rules, tree)
  assert specs == {"attn": {"q_proj": {"kernel": P("fsdp")}}, "norm": {"scale": P()},
                   "step": P()}
  specs = parallel.match_partition_specs(rules[::-1], tree)
  assert specs["attn"]["q_proj"]["kernel"] == P("tensor", "fsdp")


def test_non_divisible_dimension_falls_back_with_warning_or_raises(caplog):
  mesh = parallel.make_mesh((1, 4, 2), parallel.MESH_AXES)
  tree = {"blocks": {"w": jax.ShapeDtypeStruct((6, 8), jnp.float32)}}
  rules = [(r"w$", P("fsdp", "tensor"))]
  with caplog.at_level(logging.WARNING):
    specs = parallel.match_partition_specs(rules, tree, mesh=mesh)
  assert specs["blocks"]["w"] == P(None, "tensor")
  assert "blocks/w" in caplog.text and "not divisible" in caplog.text
  with pytest.raises(ValueError, match=r"'blocks/w' of shape \(6, 8\).*dim 0"):
    parallel.match_partition_specs(rules, tree, mesh=mesh, strict=True)
  sh = parallel.named_shardings(mesh, rules, tree)["blocks"]["w"]
  assert sh.spec == P(None, "tensor") and sh.mesh.shape == mesh.shape


def test_bad_rules_raise_clearly(caplog):
  mesh = parallel.make_mesh((2, 2, 2), parallel.MESH_AXES)
  tree = {"bias": np.zeros(8), "members": np.zeros((4, 8))}
  with pytest.raises(ValueError, match="'bias' of shape \\(8,\\)"):
    parallel.match_partition_specs([("bias", P("fsdp", "tensor"))], tree)
  with pytest.raises(ValueError, match="twice"):
    parallel.match_partition_specs([("members", P("fsdp", "fsdp"))], tree)
  with caplog.at_level(logging.WARNING):
    specs = parallel.match_partition_specs([("members", P("ensemble", "tensor"))], tree,
                                           mesh=mesh)
  assert specs["members"] == P(None, "tensor") and "ensemble" in caplog.text
  with pytest.raises(ValueError, match="lacks"):
    parallel.match_partition_specs([("members", P("ensemble"))], tree, mesh=mesh, strict=True)


def test_describe_shardings_accepts_specs_shardings_and_prng_keys():
  mesh = parallel.make_mesh((2, 2, 2), parallel.MESH_AXES)
  tree = {"key": jax.random.key(0), "spec": P("fsdp"),
          "named": NamedSharding(mesh, P(None, "tensor")),
          "w": jax.device_put(np.zeros((4, 6), np.float32), NamedSharding(mesh, P("data")))}
  lines = parallel.describe_shardings(tree).splitlines()
  assert lines == [
      "key  () key<fry>  unsharded",
      "named  P(None, 'tensor')",
      "spec  P('fsdp',)",
      "w  (4, 6) float32  shard (2, 6)  P('data',)",
      "total: 25 elements, 56 B per device",  # 8 B key + 2*6*4 B shard
  ]


# --------------------------------------------------------------------------
# Meshes.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,names,shape", [
    ({"shape": (-1, 1, 1)}, ("data", "fsdp", "tensor"), (8, 1, 1)),
    ({"shape": (2, -1, 2)}, ("data", "fsdp", "tensor"), (2, 2, 2)),
    ({"shape": {"data": -1, "tensor": 2}}, ("data", "fsdp", "tensor"), (4, 1, 2)),
    ({"shape": (-1, 1, 1), "ensemble": 2}, ("ensemble", "data", "fsdp", "tensor"), (2, 4, 1, 1)),
    ({"shape": (4, 2, 1, 1)}, ("ensemble", "data", "fsdp", "tensor"), (4, 2, 1, 1)),
    ({"shape": (2, -1), "axis_names": ("data", "model")}, ("data", "model"), (2, 4)),
])
def test_mesh_from_config(cfg, names, shape):
  mesh = parallel.mesh_from_config(ml_collections.ConfigDict(cfg))
  assert mesh.axis_names == names
  assert tuple(mesh.shape.values()) == shape
  assert mesh.axis_types == (AxisType.Auto,) * len(names)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("shape,message", [
    ((3, 1, 1), "3 devices but 8"),
    ((-1, 3, 1), r"fixed sizes \(3\) does not divide the device count \(8\)"),
    ((-1, -1, 1), "more than one -1"),
    ((0, 8, 1), "size < 1"),
    ((2, 4), "must have 3 entries"),
])
def test_bad_mesh_shapes_raise(shape, message):
  with pytest.raises(ValueError, match=message):
    parallel.mesh_from_config({"shape": shape})


def test_an_ensemble_axis_without_a_deep_ensemble_is_warned_about(caplog):
  mesh = parallel.mesh_from_config({"shape": (-1, 1, 1), "ensemble": 4})
  experiment.partition_rules(object(), mesh)  # a one-model (or heads-ensemble) RM
  assert "mesh.ensemble=4, but only a deep ensemble" in caplog.text


def test_negative_mesh_counts_raise():
  with pytest.raises(ValueError, match=r"mesh.ensemble=-1: 0 or 1 \(no ensemble axis\)"):
    parallel.mesh_from_config({"shape": (-1, 1, 1), "ensemble": -1})
  with pytest.raises(ValueError, match=r"mesh.num_devices=-1: 0 \(every device\) or a count"):
    experiment.make_mesh({"shape": (-1, 1, 1), "num_devices": -1})


def test_make_mesh_validates_names():
  with pytest.raises(ValueError, match="differ in length"):
    parallel.make_mesh((2, 4), ("data",))
  with pytest.raises(ValueError, match="duplicate"):
    parallel.make_mesh((2, 4), ("data", "data"))
  with pytest.raises(ValueError, match="no 'shape'"):
    parallel.mesh_from_config({})


def test_batch_sharding_and_shard_batch():
  mesh = parallel.make_mesh((2, 2, 2), parallel.MESH_AXES)
  assert parallel.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
  assert parallel.batch_sharding(mesh, 0).spec == P()
  batch = {"tokens": np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
           "weight": np.ones(8, np.float32), "step": np.int32(3)}
  sharded = parallel.shard_batch(batch, mesh)
  assert sharded["tokens"].sharding.spec == P(("data", "fsdp"), None)
  assert sharded["tokens"].addressable_shards[0].data.shape == (2, 6)  # 8 rows / (2*2)
  assert sharded["step"].sharding.spec == P()
  np.testing.assert_array_equal(sharded["tokens"], batch["tokens"])
  with pytest.raises(ValueError, match="'tokens' has leading dim 6"):
    parallel.shard_batch({"tokens": np.zeros((6, 3), np.int32)}, mesh)
  no_fsdp = parallel.make_mesh((8,), ("data",))
  assert parallel.batch_sharding(no_fsdp, 2).spec == P(("data",), None)


# --------------------------------------------------------------------------
# Distributed initialisation.
# --------------------------------------------------------------------------


def test_flags_survive_reimport_and_reload():
  importlib.reload(distributed)
  importlib.import_module("prefjax.parallel.distributed")
  for name in ("coordinator_address", "num_processes", "process_id"):
    assert name in flags.FLAGS


@pytest.fixture
def fake_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  return calls


def test_single_host_is_a_noop(fake_initialize):
  info = parallel.initialize_distributed(env={}, flag_values=flags.FlagValues())
  assert fake_initialize == []
  assert info == parallel.process_info()
  assert (info.process_index, info.process_count, info.device_count) == (0, 1, 8)
  assert info.is_coordinator and info.platform == "cpu"


def test_initialize_from_parsed_flags(fake_initialize):
  fv = flags.FlagValues()
  parallel.define_flags(fv)
  parallel.define_flags(fv)  # idempotent
  fv(["prog", "--coordinator_address=10.0.0.1:1234", "--num_processes=4", "--process_id=3"])
  parallel.initialize_distributed(env={}, flag_values=fv)
  assert fake_initialize == [dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                  process_id=3, local_device_ids=None)]
  # Explicit arguments override flags.
  parallel.initialize_distributed("h:1", 2, 0, env={}, flag_values=fv)
  assert fake_initialize[-1]["coordinator_address"] == "h:1"


def test_initialize_on_detected_cluster_and_bad_settings(fake_initialize):
  parallel.initialize_distributed(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"},
                                  flag_values=flags.FlagValues())
  assert fake_initialize == [dict(coordinator_address=None, num_processes=None,
                                  process_id=None, local_device_ids=None)]
  parallel.initialize_distributed(
      env={"JAX_COORDINATOR_ADDRESS": "w0:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
      flag_values=flags.FlagValues())
  assert fake_initialize[-1] == dict(coordinator_address="w0:99", num_processes=2,
                                     process_id=1, local_device_ids=None)
  with pytest.raises(ValueError, match="coordinator address"):
    parallel.initialize_distributed(num_processes=2, env={}, flag_values=flags.FlagValues())
  with pytest.raises(ValueError, match=r"process_id=5 is outside \[0, 2\)"):
    parallel.initialize_distributed("h:1", 2, 5, env={}, flag_values=flags.FlagValues())


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"}, "slurm"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "ompi"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "w0:8080"}, "tpu_multislice"),
    ({"JAX_COORDINATOR_ADDRESS": "w0:1234"}, "jax_env"),
])
def test_detect_cluster(env, expected):
  assert parallel.detect_cluster(env) == expected


def test_second_initialization_is_skipped(fake_initialize, monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  info = parallel.initialize_distributed("h:1", 2, 0, env={}, flag_values=flags.FlagValues())
  assert fake_initialize == [] and info.process_count == 1


def test_process_agreement_takes_every_process_view(monkeypatch):
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  assert parallel.in_any_process(True) and not parallel.in_every_process(False)
  assert parallel.every_process(7).tolist() == [7]
  others = {"value": 0}  # the other process's value in the all-gather
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.asarray([x, others["value"]]))
  assert parallel.every_process(3).tolist() == [3, 0]
  assert not parallel.in_any_process(False) and parallel.in_any_process(True)
  assert not parallel.in_every_process(True)  # the other process lacks it
  others["value"] = 1
  assert parallel.in_any_process(False) and parallel.in_every_process(True)
  others["value"] = 15
  assert parallel.highest_in_any_process(0) == 15 and parallel.highest_in_any_process(20) == 20
