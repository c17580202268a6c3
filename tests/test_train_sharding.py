"""Sharding: 8 fake CPU devices (data=2, fsdp=2, tensor=2) train like one device, and every
param's PartitionSpec of the large presets matches a committed golden table.

Regenerate the golden tables (after an intended change of the rules or of a model's params):
    .venv/bin/python tests/test_train_sharding.py --regenerate transformer_340m [hope_340m ...]
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
GOLDEN_MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def load_preset(name):
    spec = importlib.util.spec_from_file_location("lm_presets", ROOT / "experiments" / "lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


def abstract_model(preset):
    """The abstract model of a preset (building it must succeed: a failure is a regression)."""
    from nl_jax.train import trainer

    return trainer.abstract_model(load_preset(preset).model, 0)


def spec_table(preset):
    from flax import nnx

    from nl_jax.train import sharding

    model = abstract_model(preset)
    return sharding.param_spec_table(nnx.state(model, nnx.Param), GOLDEN_MESH)


@pytest.mark.parametrize(
    "golden", sorted(GOLDEN.glob("sharding_*.json")), ids=lambda p: p.stem.removeprefix("sharding_")
)
def test_golden_sharding_table(golden):
    expected = json.loads(golden.read_text())
    assert expected["mesh"] == GOLDEN_MESH
    got = spec_table(expected["preset"])
    assert sorted(got) == sorted(expected["params"]), "the set of params changed"
    diff = {k: (expected["params"][k], v) for k, v in got.items() if expected["params"][k] != v}
    assert not diff, f"PartitionSpecs changed (golden, now): {diff}"


def test_golden_tables_exist():
    assert (GOLDEN / "sharding_transformer_340m.json").exists()


SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import jax, numpy as np
    from nl_jax import data as nl_data
    from nl_jax.train import sharding, trainer

    spec = importlib.util.spec_from_file_location("lm", "experiments/lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(sys.argv[1])
    for key, value in json.loads(sys.argv[2]).items():  # dotted config keys
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    it = nl_data.from_config(config.data, "train")
    batches = [next(it) for _ in range(config.num_steps)]

    # Record the shardings q, k and v reach the attention kernel with (cuDNN needs them equal).
    qkv_specs, attention = [], jax.nn.dot_product_attention

    def inspected_attention(q, k, v, *args, **kwargs):
        for x in (q, k, v):
            jax.debug.inspect_array_sharding(x, callback=lambda s: qkv_specs.append(str(s.spec)))
        return attention(q, k, v, *args, **kwargs)

    jax.nn.dot_product_attention = inspected_attention

    def run(devices, mesh_cfg):
        mesh = sharding.make_mesh(mesh_cfg, devices)
        program = trainer.build_program(config, mesh)
        state = program.init()
        if len(devices) > 1:  # init_on=host gives the same sharded state as the jitted init
            on_host = trainer.initial_state(program, "host")
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(on_host), strict=True):
                assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))
        losses = []
        for b in batches:
            state, m = program.train_step(state, trainer.global_batch(b, program.batch_shardings))
            losses.append(float(m["loss"]))
        specs = {
            "/".join(str(getattr(k, "key", k)) for k in path): str(x.sharding.spec)
            for path, x in jax.tree_util.tree_leaves_with_path(state["params"])
        }
        return losses, specs

    assert jax.device_count() == 8
    one, _ = run(jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1})
    qkv_specs.clear()
    eight, specs = run(jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2})
    result = {"one": one, "eight": eight, "specs": specs, "qkv": qkv_specs}
    print("RESULT " + json.dumps(result))
    """
)


# Sharding, not depth, is under test: one layer keeps the compiles short.
TRANSFORMER_RUN = {"seq_len": 64, "global_batch_size": 8, "num_steps": 5, "model.num_layers": 1,
                   "data.default_max_bytes": 300_000, "data.num_threads": 1}  # fmt: skip


@pytest.mark.slow
def test_eight_devices_train_like_one():
    """Training Transformer++ (one layer) on 8 fake devices equals one device. (Hope on this
    mesh, across two processes, trains like one device in tests/test_multiprocess.py.)"""
    # Keep the fast-compile flags of conftest.py (they are in XLA_FLAGS) and add 8 fake devices.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, "transformer_tiny", json.dumps(TRANSFORMER_RUN)], cwd=ROOT,
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    # The params really are sharded on the 8-device mesh (not silently replicated).
    assert any("fsdp" in s for s in out["specs"].values())
    assert any("tensor" in s for s in out["specs"].values())
    assert out["one"][-1] < out["one"][0]
    # q, k and v meet the attention kernel sharded alike, over the batch axes (cuDNN's
    # partitioner rejects anything else under FSDP).
    assert out["qkv"] and len(set(out["qkv"])) == 1, out["qkv"]
    assert "'data', 'fsdp'" in out["qkv"][0], out["qkv"]
    for a, b in zip(out["one"], out["eight"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (out["one"], out["eight"])


def test_constrain_is_identity_outside_a_mesh_and_pins_inside(monkeypatch):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from nl_jax.layers import axes

    names = (axes.BATCH, axes.SEQ, axes.HEADS, axes.HEAD_DIM)
    q, kv = jnp.ones((4, 3, 4, 5)), jnp.ones((4, 3, 2, 5))
    assert axes.constrain(q, names) is q
    assert axes.same_sharding(q, kv, kv, names=names) == (q, kv, kv)

    class Spec:  # stands in for a NamedSharding: only `.spec` is read
        def __init__(self, *spec):
            self.spec = PartitionSpec(*spec)

    def resolve(names, shape):
        # Split heads only where there are 4 of them: k/v (2 heads) stay coarser.
        return Spec(("data", "fsdp"), None, "tensor" if shape[2] == 4 else None, None)

    pinned = []
    monkeypatch.setattr(
        jax.lax, "with_sharding_constraint", lambda x, s: pinned.append((x.shape, s.spec)) or x
    )
    with axes.activation_sharding(resolve):
        axes.same_sharding(q, kv, kv, names=names)
        axes.constrain(q, names)
        with pytest.raises(ValueError, match="3 axis names"):
            axes.constrain(q, names[:3])
    coarse, fine = PartitionSpec(("data", "fsdp"), None, None, None), resolve(names, q.shape).spec
    assert pinned == [(q.shape, coarse), (kv.shape, coarse), (kv.shape, coarse), (q.shape, fine)]
    assert axes.constrain(q, names) is q  # the context is gone again


def regenerate(presets):
    """Write tests/golden/sharding_<preset>.json for each preset."""
    GOLDEN.mkdir(exist_ok=True)
    for preset in presets:
        table = spec_table(preset)
        path = GOLDEN / f"sharding_{preset}.json"
        command = f".venv/bin/python tests/test_train_sharding.py --regenerate {preset}"
        payload = {"preset": preset, "mesh": GOLDEN_MESH, "regenerate": command, "params": table}
        path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {path} ({len(table)} params)")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--regenerate":
        sys.exit(__doc__)
    sys.path.insert(0, str(ROOT))
    regenerate(sys.argv[2:])
