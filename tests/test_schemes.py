"""``orthoopt.quant.schemes``: every scheme is compressed-tensors' preset of that name, in orthoopt's terms.

The comparison reads the installed compressed-tensors' presets field by field (weights: type, num_bits,
strategy, group_size, symmetric, static; input activations: type, num_bits, strategy, dynamic,
symmetric), with criteria written here, not the module's own converter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orthoopt.quant.schemes import SCHEMES, Scheme, get_scheme, resolve

DEFAULTS = Scheme(4, None).settings()


def ct_presets() -> dict:
    quant_scheme = pytest.importorskip("compressed_tensors.quantization.quant_scheme")
    return quant_scheme.PRESET_SCHEMES


def value(x) -> str:
    return str(getattr(x, "value", x))


def representable(preset: dict) -> bool:
    """An integer preset with per-channel or grouped static weights and, if any, per-token dynamic
    integer input activations, nothing on the outputs."""
    w, a = preset.get("weights"), preset.get("input_activations")
    if w is None or value(w.type) != "int" or value(w.strategy) not in ("channel", "group") or w.dynamic:
        return False
    if a is not None and (value(a.type) != "int" or value(a.strategy) != "token" or a.dynamic is not True):
        return False
    return preset.get("output_activations") is None


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_is_the_compressed_tensors_preset(name):
    presets = ct_presets()
    assert name in presets, f"{name} is not a compressed-tensors preset"
    from compressed_tensors.quantization import preset_name_to_scheme

    ct, ours = preset_name_to_scheme(name, ["Linear"]), SCHEMES[name]
    w = ct.weights
    assert (value(w.type), w.num_bits, w.symmetric, w.dynamic) == ("int", ours.wbits, ours.sym, False)
    assert value(w.strategy) == ("group" if ours.group_size else "channel")
    assert w.group_size == ours.group_size
    a = ct.input_activations
    if ours.abits == 16:
        assert a is None
    else:
        assert (value(a.type), a.num_bits, value(a.strategy), a.dynamic, a.symmetric) == (
            "int", ours.abits, "token", True, ours.act_sym)
    assert ct.output_activations is None


def test_w4a16_is_the_deployment_default_group_128():
    from compressed_tensors.quantization import preset_name_to_scheme

    ct_presets()
    expected = preset_name_to_scheme("W4A16", ["Linear"]).weights.group_size
    assert get_scheme("W4A16").group_size == expected and expected is not None


def test_every_representable_preset_is_in_the_table_and_the_rest_are_refused_with_a_reason():
    presets = ct_presets()
    missing = sorted(n for n, p in presets.items() if representable(p) and n not in SCHEMES)
    assert not missing, f"compressed-tensors presets orthoopt can represent but the table lacks: {missing}"
    refused = [n for n, p in presets.items() if not representable(p)]
    assert refused  # float and block presets exist in every compressed-tensors with PRESET_SCHEMES
    for name in refused:
        with pytest.raises(ValueError, match="cannot be represented: .+; supported schemes: W2A16") as e:
            get_scheme(name)
        assert all(s in str(e.value) for s in SCHEMES)


def test_names_are_case_insensitive_and_unknown_names_list_the_supported_ones():
    assert get_scheme("w4a16_asym") == SCHEMES["W4A16_ASYM"] and not SCHEMES["W4A16_ASYM"].sym
    with pytest.raises(ValueError, match="unknown scheme 'W9A1'; supported schemes: ") as e:
        get_scheme("W9A1")
    assert str(e.value).endswith(", ".join(SCHEMES))


def test_the_table_needs_no_compressed_tensors(monkeypatch):
    monkeypatch.setitem(sys.modules, "compressed_tensors.quantization.quant_scheme", None)  # import fails
    assert get_scheme("W8A8") == SCHEMES["W8A8"]
    with pytest.raises(ValueError, match="unknown scheme 'FP8'"):
        get_scheme("FP8")


def test_explicit_flags_win_and_are_recorded():
    scheme = SCHEMES["W4A8"]
    settings, overrides = resolve("W4A8", {"wbits": 3, "group_size": None, "sym": scheme.sym}, DEFAULTS)
    assert settings == {**scheme.settings(), "wbits": 3, "group_size": None}
    assert overrides == {"wbits": {"scheme": scheme.wbits, "flag": 3},
                         "group_size": {"scheme": scheme.group_size, "flag": None}}  # sym: the same, no override
    assert resolve("W4A8", {}, DEFAULTS) == (scheme.settings(), {})
    assert resolve(None, {"abits": 8}, DEFAULTS) == ({**DEFAULTS, "abits": 8}, {})
    with pytest.raises(ValueError, match="unknown quantizer settings"):
        resolve("W4A8", {"bits": 3}, DEFAULTS)


def test_the_table_in_docs_quantization_is_the_table():
    text = (Path(__file__).resolve().parents[1] / "docs" / "quantization.md").read_text(encoding="utf-8")
    section = text.split("## Schemes by name", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            name, bits, group, grid, act = cells
            abits = 16 if act == "not quantized" else int(act.split("-bit")[0])
            rows[name.strip("`")] = Scheme(int(bits), None if group == "per channel" else int(group),
                                           sym=grid == "symmetric", abits=abits, act_sym="asymmetric" not in act)
    assert rows == SCHEMES
