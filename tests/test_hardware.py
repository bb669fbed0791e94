"""PLMR wafer descriptions: presets, provenance, user files, overrides, errors, CLI, GPUs."""

from __future__ import annotations

import json
import re

import pytest

from waferllm.errors import HardwareError, MeshError
from waferllm.hardware import get_gpu, get_wafer, load_wafer_file, parse_overrides, preset_names
from waferllm.hardware.plmr import STATUSES, _FIELDS
from waferllm.interfaces.cli import main
from waferllm.mesh import Region


def test_presets_load():
    assert {"wse2", "wse3"} <= set(preset_names())
    w2, w3 = get_wafer("wse2"), get_wafer("wse3")
    assert (w2.rows, w2.cols, w2.pes) == (750, 994, 745_500)
    assert (w3.rows, w3.cols) == (755, 1170)
    assert w2.sram_bytes_per_pe == 48 * 1024
    assert w2.clock_hz == pytest.approx(1.1e9)
    assert w2.link_bytes_per_cycle == 4
    assert w2.routable_routes_per_pe == 24
    assert w2.usable_sram_bytes_per_pe == w2.sram_bytes_per_pe - w2.reserved_bytes_per_pe
    assert get_wafer("WSE2") == w2  # case-insensitive preset names


@pytest.mark.parametrize("name", ["wse2", "wse3"])
def test_every_constant_has_provenance(name):
    w = get_wafer(name)
    for key in _FIELDS:
        p = w.source_of(key)
        assert key in w.provenance, key
        assert p.status in STATUSES and p.status in ("measured", "derived", "assumed", "calibrated", "user")
        assert p.source and p.source != "unspecified"
    d = w.to_dict()
    assert all(d[k]["status"] in STATUSES for k in _FIELDS)


def test_cli_hardware_json(capsys):
    assert main(["hardware", "wse2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pes"] == 745_500
    assert out["total_sram_bytes"] == pytest.approx(36.6e9, rel=0.01)
    for key in ("rows", "cols", "sram_bytes_per_pe", "clock_hz"):
        assert key in out
    assert out["rows"] == 750 and out["cols"] == 994


def test_cli_hardware_provenance_and_table(capsys):
    assert main(["hardware", "wse3", "--json", "--provenance"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["constants"]["rows"]["status"] in STATUSES
    assert main(["hardware", "wse2"]) == 0
    text = capsys.readouterr().out
    assert "745,500" in text and "measured" in text


def test_cli_set_override(capsys):
    assert main(["hardware", "wse2", "--json", "--set", "rows=100", "--set", "beta_cycles=40", "--provenance"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 100 and out["pes"] == 100 * 994 and out["beta_cycles"] == 40
    assert out["constants"]["rows"]["status"] == "user"
    assert out["constants"]["cols"]["status"] == "measured"


@pytest.mark.parametrize("args, needle", [
    (["hardware", "wse2", "--set", "rows=0"], "rows must be > 0"),
    (["hardware", "wse2", "--set", "bogus=1"], "unknown wafer field"),
    (["hardware", "wse2", "--set", "rows"], "KEY=VALUE"),
    (["hardware", "nope"], "unknown wafer"),
])
def test_cli_errors_are_clean(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error" in err and needle in " ".join(err.split())


def test_user_toml_with_base(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('base = "wse2"\nbeta_cycles = { value = 55, source = "fit to section 5", status = "calibrated" }\n')
    w = load_wafer_file(f)
    base = get_wafer("wse2")
    assert w.beta_cycles == 55 and w.rows == base.rows and w.sram_bytes_per_pe == base.sram_bytes_per_pe
    assert w.source_of("beta_cycles").status == "calibrated"
    assert w.source_of("rows") == base.source_of("rows")
    # bare value: marked user, from that file
    f.write_text('base = "wse2"\nrows = 100\n')
    w = get_wafer(str(f))
    assert w.rows == 100 and w.source_of("rows").status == "user" and str(f) in w.source_of("rows").source


def test_json_file(tmp_path):
    full = get_wafer("wse3").to_dict()
    full["name"] = "mywafer"
    f = tmp_path / "w.json"
    f.write_text(json.dumps(full))
    w = load_wafer_file(f)
    assert w.name == "mywafer" and w.rows == 755 and w.cols == 1170
    assert w.source_of("rows") == get_wafer("wse3").source_of("rows")
    g = tmp_path / "small.json"
    g.write_text(json.dumps({"base": "wse2", "rows": 10, "cols": 12, "defective_pes": [[1, 2]]}))
    w = get_wafer(g)
    assert (w.rows, w.cols, w.defective_pes) == (10, 12, frozenset({(1, 2)}))


@pytest.mark.parametrize("body, needle", [
    ('base = "wse2"\nrows = 0\n', "rows must be > 0"),
    ('base = "wse2"\ncols = -3\n', "cols must be > 0"),
    ('base = "wse2"\nsram_bytes_per_pe = 0\n', "sram_bytes_per_pe must be > 0"),
    ('base = "wse2"\nbeta_cycles = -1\n', "beta_cycles must be >= 0"),
    ('base = "wse2"\nrows = 10.5\n', "whole number"),
    ('base = "wse2"\nrows = "many"\n', "must be a number"),
    ('base = "wse2"\nrows = true\n', "must be a number"),
    ('base = "wse2"\nrowz = 10\n', "unknown key(s) rowz"),
    ('base = "wse2"\nrows = [1\n', "not valid TOML"),
    ('base = "wse2"\ndefective_pes = [[750, 0]]\n', "outside the 750x994 mesh"),
    ('base = "wse2"\ndefective_pes = [[1, 2, 3]]\n', "[row, col] pairs"),
    ('base = "wse2"\nreserved_bytes_per_pe = 49152\n', "must be smaller"),
    ('base = "wse2"\nrows = { source = "x" }\n', "has no 'value'"),
    ('base = "wse2"\nrows = { value = 5, status = "guessed" }\n', "status must be one of"),
    ('base = "nothere"\n', "unknown wafer"),
    ('rows = 10\n', "missing required key"),
])
def test_bad_files(tmp_path, body, needle):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(HardwareError, match=re.escape(needle)):
        load_wafer_file(f)


def test_bad_json_and_missing_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(HardwareError, match="not valid JSON"):
        load_wafer_file(f)
    f.write_text("[1, 2]")
    with pytest.raises(HardwareError, match="expected a table"):
        load_wafer_file(f)
    with pytest.raises(HardwareError, match="not found"):
        load_wafer_file(tmp_path / "none.toml")


def test_overrides_api():
    w = get_wafer("wse2", beta_cycles="45", rows=8)
    assert w.beta_cycles == 45.0 and w.rows == 8
    assert w.source_of("beta_cycles").status == "user"
    assert parse_overrides(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    with pytest.raises(HardwareError, match="reserved_bytes_per_pe"):
        get_wafer("wse2", reserved_bytes_per_pe=10**6)
    with pytest.raises(HardwareError, match="outside"):
        get_wafer("wse2", defective_pes=[[5, 5]], rows=4)
    with pytest.raises(HardwareError, match="finite"):
        get_wafer("wse2", alpha_cycles="inf")
    with pytest.raises(HardwareError, match="unknown wafer field"):
        get_wafer("wse2", clock=1)


def test_derived_figures():
    w = get_wafer("wse2")
    assert w.total_sram_bytes == 745_500 * 49152
    assert w.peak_flops("fp16") == pytest.approx(2 * w.fp16_macs_per_cycle * 745_500 * 1.1e9)
    assert w.peak_flops("fp16") == pytest.approx(2 * 2 * 745_500 * 1.1e9)  # the fitted two fp16 lanes
    assert w.peak_flops("fp32") == pytest.approx(2 * 745_500 * 1.1e9)
    assert w.cycles_to_seconds(1.1e9) == pytest.approx(1.0)
    assert w.bisection_bandwidth == pytest.approx(2 * 750 * 4 * 1.1e9)
    with pytest.raises(HardwareError, match="unsupported dtype 'bf16'"):
        w.macs_per_cycle("bf16")


def test_gpu_presets():
    for name in ("a100", "A100-80GB", "h100", "H100-SXM", "h200", "H200"):
        g = get_gpu(name)
        assert g.peak_flops_fp16 > 0 and g.hbm_bytes_per_s > 0 and g.power_w > 0 and g.source
    assert get_gpu("a100").hbm_bytes_per_s == pytest.approx(2.04e12)
    assert get_gpu("h100").peak_flops_fp16 == pytest.approx(989e12)
    assert get_gpu("h200").hbm_bytes_per_s == pytest.approx(4.8e12)
    g = get_gpu("h100")
    assert g.roofline_seconds(989e12, 1.0) == pytest.approx(1.0)
    assert g.roofline_seconds(0, 3.35e12, count=2) == pytest.approx(0.5)
    with pytest.raises(HardwareError, match="unknown GPU"):
        get_gpu("tpu")


def test_regions():
    w = get_wafer("wse2")
    Region(w, 750, 994)
    with pytest.raises(MeshError, match="outside"):
        Region(w, 751, 10)
    with pytest.raises(MeshError, match="outside"):
        Region(w, 10, 10, row0=745, col0=0)
    with pytest.raises(MeshError, match="outside"):
        Region(w, 10, 10, row0=-1)
    with pytest.raises(MeshError, match="positive"):
        Region(w, 0, 10)
    bad = get_wafer("wse2", defective_pes=[[3, 4]])
    with pytest.raises(MeshError, match="defective"):
        Region(bad, 8, 8)
    Region(bad, 3, 8)  # rows 0..2: healthy
    Region(bad, 8, 8, row0=4)


ENERGY_FIELDS = ("mac_energy_fp16_pj", "mac_energy_fp32_pj", "sram_read_energy_pj_per_byte",
                 "sram_write_energy_pj_per_byte", "fabric_energy_pj_per_bit_hop", "static_power_w")


def test_energy_constants_follow_their_stated_derivation():
    w2, w3 = get_wafer("wse2"), get_wafer("wse3")
    n7 = (57 / 160) * (0.75 / 0.9) ** 2  # 45 nm -> N7: contacted gate pitch x voltage squared
    assert n7 == pytest.approx(0.25, rel=0.02)
    # Horowitz ISSCC 2014, 45 nm: fp16 mult 1.1 + fp32 add 0.9 pJ; fp32 mult 3.7 + add 0.9 pJ; 8 KB SRAM 10 pJ / 8 B
    assert w2.mac_energy_pj("fp16") == pytest.approx((1.1 + 0.9) * 0.25)
    assert w2.mac_energy_pj("fp32") == pytest.approx((3.7 + 0.9) * 0.25)
    assert w2.sram_read_energy_pj_per_byte == pytest.approx(10 / 8 * 0.25, rel=0.01)
    assert w2.sram_write_energy_pj_per_byte == pytest.approx(1.2 * w2.sram_read_energy_pj_per_byte, rel=0.01)
    # N5: logic x 0.7 (vendor's 30% less power), SRAM x sqrt(0.021 / 0.027)
    assert w3.mac_energy_fp16_pj == pytest.approx(0.7 * w2.mac_energy_fp16_pj)
    assert w3.mac_energy_fp32_pj == pytest.approx(0.7 * w2.mac_energy_fp32_pj, rel=0.01)
    assert w3.sram_read_energy_pj_per_byte == pytest.approx(w2.sram_read_energy_pj_per_byte * (0.021 / 0.027) ** 0.5,
                                                            rel=0.02)
    # one hop: router + wire of one PE pitch (wafer area / cores) at ~0.056 pJ/bit/mm
    pitch2 = (46_225 / 850_000) ** 0.5
    assert pitch2 == pytest.approx(0.233, rel=0.01)
    assert w2.fabric_energy_pj_per_bit_hop == pytest.approx(0.05 + 0.056 * pitch2, rel=0.1)
    assert w3.fabric_energy_pj_per_bit_hop == pytest.approx(0.035 + 0.056 * (46_225 / 900_000) ** 0.5, rel=0.1)
    # static: transistors x ~0.9 nW (A100: ~50 W idle / 54.2e9) + ~1.5 kW always-on
    assert w2.static_power_w == pytest.approx(2.6e12 * 50 / 54.2e9 + 1500, rel=0.05)
    assert w3.static_power_w == pytest.approx(4e12 * 50 / 54.2e9 + 1500, rel=0.05)
    for w in (w2, w3):
        for key in ENERGY_FIELDS:
            assert w.source_of(key).status in ("derived", "assumed"), key
        assert w.static_power_w < w.power_w  # the always-on part of the whole-system figure
    with pytest.raises(HardwareError, match="unsupported dtype 'bf16'"):
        w2.mac_energy_pj("bf16")


def test_cli_hardware_shows_energy_constants(capsys):
    assert main(["hardware", "wse2", "--json", "--provenance", "--set", "static_power_w=0"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ENERGY_FIELDS:
        assert key in out and key in out["constants"], key
        assert out["constants"][key]["source"], key
    assert out["static_power_w"] == 0 and out["constants"]["static_power_w"]["status"] == "user"
    assert out["constants"]["mac_energy_fp16_pj"] == {**out["constants"]["mac_energy_fp16_pj"], "value": 0.5,
                                                      "status": "derived"}
    assert "Horowitz" in out["constants"]["mac_energy_fp16_pj"]["source"]
