"""bench/forward_profile.py: its FLOP counts against torch's own counter and DETR's shapes worked
out by hand, and its time split adding up to the profiled forward."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from extractor.detr import build_detr
from extractor.fastpath import optimise_for_inference

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "forward_profile.py"


@pytest.fixture(scope="module")
def fp():
    spec = importlib.util.spec_from_file_location("forward_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.fc = nn.Linear(8 * 6 * 7, 5)
        self.fc_nobias = nn.Linear(5, 4, bias=False)

    def forward(self, x, mask=None):
        return self.fc_nobias(self.fc(self.grouped(self.conv(x)).flatten(1)))


def test_counts_equal_torchs_flop_counter(fp):
    model, x = ConvThenLinear().eval(), torch.randn(2, 3, 12, 14)
    reference = FlopCounterMode(display=False)
    with torch.no_grad(), reference:
        model(x)
    want = reference.get_total_flops()
    got = fp.count_flops(model, x, None)
    assert got["convolutions"] + got["linear layers"] == want
    assert got["linear layers"] == 2 * 2 * (8 * 6 * 7 * 5 + 5 * 4)
    assert got["attention"] == got["other"] == 0


def test_attention_count_from_shapes(fp):
    class Attend(nn.Module):
        def forward(self, x, mask=None):
            q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
            return nn.functional.scaled_dot_product_attention(q, k, v)

    got = fp.count_flops(Attend(), torch.zeros(1), None)
    assert got["attention"] == 2 * 2 * 4 * 7 * 9 * (16 + 16)


def test_detr_counts_match_its_shapes(fp):
    """Convolutions: a forward hook on every nn.Conv2d (an independent count); linear layers and
    attention: DETR's 6+6 layers at D=256, 8 heads, FFN 2048, 100 queries, worked out by hand."""
    torch.manual_seed(0)
    model = build_detr().eval()
    height, width = 96, 128
    x, mask = torch.randn(1, 3, height, width), torch.zeros(1, height, width, dtype=torch.bool)
    counting = fp.counting_model(model)
    hooked = []
    for m in counting.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, i, out: hooked.append(
                2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]))
    got = fp.count_flops(counting, x, mask)
    assert got["convolutions"] == sum(hooked) > 0

    cells, d, ffn, q = (height // 32) * (width // 32), 256, 2048, 100
    enc = 2 * cells * d * (3 * d) + 2 * cells * d * d + 2 * 2 * cells * d * ffn
    dec = (2 * q * d * 3 * d + 2 * q * d * d            # self-attention in/out projections
           + 2 * q * d * d + 2 * cells * d * 2 * d + 2 * q * d * d  # cross: q, k+v, out
           + 2 * 2 * q * d * ffn)
    heads = 2 * q * d * 92 + 2 * (2 * q * d * d) + 2 * q * d * 4  # class head; box MLP 256-256-256-4
    input_proj = 2 * cells * 2048 * d
    assert got["linear layers"] == 6 * enc + 6 * dec + heads + input_proj
    attention = 6 * 4 * cells * cells * d + 6 * (4 * q * q * d + 4 * q * cells * d)
    assert got["attention"] == attention


def test_family_names(fp):
    assert fp.family_of("mkldnn::_convolution_pointwise_") == "convolutions"
    assert fp.family_of("aten::mkldnn_convolution") == "convolutions"
    assert fp.family_of("mkldnn::_linear_pointwise") == "linear layers"
    assert fp.family_of("aten::addmm") == "linear layers"
    assert fp.family_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert fp.family_of("aten::native_layer_norm") == "other"
    assert fp.family_of("aten::max_pool2d_with_indices") == "other"


def test_time_split_adds_up(fp):
    torch.manual_seed(0)
    fast = optimise_for_inference(build_detr().eval(), "cpu", "fp32")
    x = torch.randn(1, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    seconds = fp.time_families(fast, x, mask, repeats=2)
    assert set(seconds) == set(fp.FAMILIES) and min(seconds.values()) >= 0
    assert seconds["convolutions"] > 0 and seconds["linear layers"] > 0 and seconds["attention"] > 0
    rows = fp.profile_rows(seconds, {"convolutions": 10**9, "linear layers": 10**8, "attention": 10**7,
                                     "other": 0}, roof=100.0)
    by = {r["family"]: r for r in rows}
    assert by["total"]["ms"] == pytest.approx(1e3 * sum(seconds.values()))
    assert sum(by[f]["share"] for f in fp.FAMILIES) == pytest.approx(1.0)
    assert by["convolutions"]["gflops"] == pytest.approx(1.0 / seconds["convolutions"])
    assert by["convolutions"]["of_roof"] == pytest.approx(by["convolutions"]["gflops"] / 100.0)
    assert by["other"]["gflops"] is None and by["other"]["of_roof"] is None


def test_main_prints_the_table(fp, capsys):
    assert fp.main(["--size", "64x96", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| family | ms / forward |" in out
    for family in (*fp.FAMILIES, "total"):
        assert f"| {family} |" in out
    with pytest.raises(SystemExit) as exc:
        fp.main(["--size", "800"])
    assert exc.value.code == 2
