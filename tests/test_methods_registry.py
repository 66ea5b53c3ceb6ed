"""The method registry: one source for the engine, config validation, the docs and the tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import REPO, compose  # noqa: E402
from tiny_gemma_config import make_tiny_inputs  # noqa: E402

from pipeline import method_names  # noqa: E402
from pipeline.config import ConfigError, validate  # noqa: E402
from pipeline.relevancy import (  # noqa: E402
    MethodOutput,
    SequenceInputs,
    Target,
    explain,
    register_method,
    registered,
    unregister_method,
)
from pipeline.relevancy.registry import NEEDS, methods_table  # noqa: E402


@pytest.fixture(scope="module")
def seq(model):
    x = make_tiny_inputs(model, seed=1, prefix_len=3, suffix_len=4, answer_len=6, greedy_answer=True)
    return SequenceInputs(x.input_ids, x.pixel_values, x.token_type_ids, prompt_length=x.prompt_length)


def test_names_module_matches_the_registry():
    specs = registered()
    assert {n: s.family for n, s in specs.items() if n in method_names.BUILTIN} == method_names.BUILTIN
    assert set(method_names.BUILTIN) <= set(specs)
    for s in specs.values():
        assert s.family in method_names.FAMILIES and s.needs <= set(NEEDS) and s.summary


def test_docs_methods_table_is_the_registry():
    """docs/methods.md carries the registry's table verbatim (regenerate it with
    `python -c "from pipeline.relevancy.registry import methods_table; print(methods_table())"`)."""
    assert methods_table() in (REPO / "docs" / "methods.md").read_text()


def test_config_side_imports_no_torch():
    code = "import sys, pipeline.config, pipeline.method_names; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_no_import_cycle_in_the_package():
    """Module-level imports inside pipeline.relevancy form no cycle (perturbation uses no engine
    helper; the registry loads the built-in methods lazily)."""
    pkg = REPO / "pipeline" / "relevancy"
    graph = {}
    for f in pkg.glob("*.py"):
        deps = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.add(node.module or "__init__")
        graph[f.stem] = deps - {"__init__"}
    assert "engine" not in graph["perturbation"]

    def visit(n, path):
        assert n not in path, f"import cycle: {' -> '.join([*path, n])}"
        for d in graph.get(n, ()):
            visit(d, [*path, n])

    for n in graph:
        visit(n, [])


def test_registered_method_is_validated_and_gets_exactly_what_it_declared(model, seq, monkeypatch):
    seen = []

    @register_method("probe_attention", family="attention", needs=("attention",))
    def probe_attention(x):
        """Test probe."""
        seen.append(("attention", x.declared, len(x.attention), tuple(x.readout.shape)))
        with pytest.raises(AttributeError, match="did not declare 'attention_grads'"):
            x.attention_grads
        return x.attention[-1].float().mean(0)[None, -1, x.image_positions].expand(len(x.targets), -1)

    @register_method("probe_grads", family="gradient", needs=("attention_grads", "embedding_grads"))
    def probe_grads(x):
        """Test probe."""
        seen.append(("grads", x.declared, len(x.targets), x.target_index))
        with pytest.raises(AttributeError):
            x.attention
        g = x.embedding_grads.float().abs().sum(-1)
        return MethodOutput(g, {"probe": torch.arange(len(x.targets), dtype=torch.float32)})

    try:
        cfg = compose(["explain.methods=[chefer,probe_attention,probe_grads]"])
        validate(cfg)
        n = seq.seq_len
        targets = [Target(n - 1, n), Target(n - 2, n - 1), Target(n - 4, n)]
        calls = []
        real = torch.autograd.grad
        monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
        out = explain(model, seq, targets, ["probe_attention"])
        assert calls == [] and out.batched is None  # no gradient pass when none was declared
        out = explain(model, seq, targets, ["probe_grads", "probe_attention"], chunk_size=2)
        assert seen[0] == ("attention", frozenset({"attention"}), 4, (3, n))
        assert [s[:2] for s in seen[1:3]] == [("grads", frozenset({"attention_grads", "embedding_grads"}))] * 2
        assert [s[2:] for s in seen[1:3]] == [(2, [0, 1]), (1, [2])]  # once per gradient chunk
        assert [r.maps["probe_grads"].extras["probe"] for r in out.results] == [0.0, 1.0, 0.0]
        assert out.map(0, "probe_grads").image_map.shape == (4, 4) and out.map(0, "probe_grads").text_map is None
    finally:
        unregister_method("probe_attention")
        unregister_method("probe_grads")
    with pytest.raises(ConfigError, match="explain.methods"):
        validate(compose(["explain.methods=[probe_attention]"]))
    with pytest.raises(ValueError, match="unknown relevancy method"):
        explain(model, seq, [Target(seq.seq_len - 1, seq.seq_len)], ["probe_attention"])


def test_registration_errors():
    with pytest.raises(ValueError, match="unknown needs"):
        register_method("x", family="attention", needs=("logits",))
    with pytest.raises(ValueError, match="unknown family"):
        register_method("x", family="magic")
    with pytest.raises(ValueError, match="already registered"):
        register_method("chefer", family="gradient")(lambda x: None)
    with pytest.raises(ValueError, match="built-in"):
        unregister_method("chefer")


def test_negative_or_non_finite_maps_raise(model, seq):
    @register_method("bad_map", family="floor")
    def bad_map(x):
        """Test probe."""
        return -torch.ones(len(x.targets), 16)

    try:
        with pytest.raises(RuntimeError, match="negative"):
            explain(model, seq, [Target(seq.seq_len - 1, seq.seq_len)], ["bad_map"])
    finally:
        unregister_method("bad_map")


def test_sequence_inputs_of_a_mapping(seq):
    same = SequenceInputs.of({"input_ids": seq.input_ids, "pixel_values": seq.pixel_values,
                              "token_type_ids": seq.token_type_ids, "attention_mask": None}, prompt_length=5)
    assert same.prompt_length == 5 and same.seq_len == seq.seq_len and same.attention_mask is None
    assert np.array_equal(same.input_ids.numpy(), seq.input_ids.numpy())
    with pytest.raises(ValueError, match="shape"):
        SequenceInputs(seq.input_ids[0]).check()
