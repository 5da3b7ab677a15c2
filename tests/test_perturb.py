"""Perturbations against hand computations; perturbed runs, their fingerprint, manifest and resume; sweep."""
from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from extractor import perturb, rundir
from extractor.perturb import Perturbation, Step, parse_perturbation, parse_sweep
from extractor.settings import ExtractSettings, fingerprint

TINY = dict(checkpoint="none", min_size=160, max_size=192)


def _all_values() -> np.ndarray:
    """Every 8-bit value once per channel: uint8 [16, 16, 3], channels shifted so they differ."""
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return np.stack([v, np.roll(v, 7), np.roll(v, 100)], axis=2)


def _random(seed: int = 0, shape=(23, 31, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _half_up(x: float) -> int:
    return min(255, max(0, math.floor(x + 0.5)))


# ------------------------------------------------------------------ each perturbation by hand
@pytest.mark.parametrize("factor", ["0.5", "0.1", "0.25", "0.7", "0.0", "1.0"])
def test_darken_is_srgb_times_factor_exactly(factor):
    img = _all_values()
    got = parse_perturbation(f"darken:{factor}").apply(img)
    # exact rational arithmetic: v * F rounded half up
    want = np.vectorize(lambda v: math.floor(Fraction(int(v)) * Fraction(factor) + Fraction(1, 2)))(img)
    np.testing.assert_array_equal(got, want.astype(np.uint8))


def _srgb_exposure_by_hand(v: int, ev: float) -> int:
    c = v / 255.0
    lin = c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    lin = min(1.0, lin * 2.0 ** ev)
    out = 12.92 * lin if lin <= 0.0031308 else 1.055 * lin ** (1 / 2.4) - 0.055
    return _half_up(255.0 * out)


@pytest.mark.parametrize("ev", [-1.0, 1.0, -3.3, 0.5])
def test_exposure_is_linear_light_times_two_to_the_ev(ev):
    img = _all_values()
    got = parse_perturbation(f"exposure:{ev}").apply(img)
    want = np.vectorize(lambda v: _srgb_exposure_by_hand(int(v), ev))(img)
    np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_exposure_known_values_and_identity():
    px = np.array([[[255, 0, 128]]], dtype=np.uint8)
    # white at -1 EV: linear 0.5 -> sRGB 1.055 * 0.5^(1/2.4) - 0.055 = 0.73536 -> 187.52 -> 188
    assert parse_perturbation("exposure:-1").apply(px)[0, 0, 0] == 188
    assert parse_perturbation("exposure:+1").apply(np.array([[[188, 0, 0]]], np.uint8))[0, 0, 0] == 255  # clipped
    # 0 EV round-trips every 8-bit value through linear light: that is why it counts as identity
    img = _all_values()
    np.testing.assert_array_equal(perturb.exposure(img, 0.0), img)
    assert parse_perturbation("exposure:0").is_identity


@pytest.mark.parametrize("g", [2.2, 0.45, 1.5])
def test_gamma_by_hand(g):
    img = _all_values()
    got = parse_perturbation(f"gamma:{g}").apply(img)
    want = np.vectorize(lambda v: _half_up(255.0 * (int(v) / 255.0) ** g))(img)
    np.testing.assert_array_equal(got, want.astype(np.uint8))


def _blur_brute_force(img: np.ndarray, sigma: float) -> np.ndarray:
    """Direct 2D convolution with a normalised Gaussian cut at 4 sigma, edges replicated."""
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k1 = np.exp(-0.5 * (x / sigma) ** 2)
    k2 = np.outer(k1, k1)
    k2 /= k2.sum()
    padded = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    out = np.zeros(img.shape, np.float64)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += k2[dy, dx] * padded[dy:dy + h, dx:dx + w]
    return out


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_blur_is_a_gaussian_convolution(sigma):
    img = _random(1, (40, 33, 3))
    got = parse_perturbation(f"blur:{sigma}").apply(img).astype(int)
    want = _blur_brute_force(img, sigma)
    # the rounding of the exact convolution: equal except where it sits on a half within float error
    assert np.abs(got - want).max() <= 0.5 + 1e-6
    assert (got == np.floor(want + 0.5)).mean() > 0.999
    # sigma is in pixels of the original: at a half-scale decode it is halved
    np.testing.assert_array_equal(parse_perturbation(f"blur:{sigma}").apply(img, scale=0.5),
                                  perturb.blur(img, sigma / 2))


def test_noise_is_seeded_per_image_and_has_its_sigma():
    gray = np.full((120, 100, 3), 128, np.uint8)
    p = parse_perturbation("noise:10")
    a, b = p.apply(gray, key="sa_1.jpg"), p.apply(gray, key="sa_1.jpg")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, p.apply(gray, key="sa_2.jpg"))
    d = a.astype(float) - 128
    assert abs(d.mean()) < 0.3 and abs(d.std() - 10) < 0.3  # 36,000 draws: sd of the sd estimate ~0.04
    # the same noise as drawing N(0, 10) from the documented seed by hand, rounded half up
    z = np.random.default_rng(np.random.SeedSequence([int.from_bytes(
        __import__("hashlib").sha256(b"sa_1.jpg").digest()[:8], "little"), 0])).standard_normal(gray.shape,
                                                                                   dtype=np.float32)
    np.testing.assert_array_equal(a, np.clip(np.floor(np.float32(128) + np.float32(10) * z + np.float32(0.5)),
                                             0, 255).astype(np.uint8))
    with pytest.raises(ValueError, match="key"):
        p.apply(gray)
    # a step that changes no pixel neither enters the fingerprint nor shifts the seed
    np.testing.assert_array_equal(parse_perturbation("darken:1.0,noise:10").apply(gray, key="sa_1.jpg"), a)
    twice = parse_perturbation("noise:10,noise:10").apply(gray, key="sa_1.jpg")
    assert not np.array_equal(twice, perturb.add_noise(a, 10.0, perturb.noise_seed("sa_1.jpg", 0)))


@pytest.mark.parametrize("q", [10, 75, 95])
def test_jpeg_is_a_pil_round_trip(q):
    img = _random(2, (48, 64, 3))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    want = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(parse_perturbation(f"jpeg:{q}").apply(img), want)


def test_jpeg_quality_orders_the_error():
    smooth = np.asarray(Image.fromarray(_random(3, (16, 16, 3))).resize((96, 96), Image.BILINEAR))
    err = [np.abs(parse_perturbation(f"jpeg:{q}").apply(smooth).astype(int) - smooth).mean() for q in (10, 50, 95)]
    assert err[0] > err[1] > err[2] > 0


def test_grayscale_is_bt601_luma():
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30]]], np.uint8)
    got = parse_perturbation("grayscale").apply(px)
    # 0.299*255 = 76.245, 0.587*255 = 149.685, 0.114*255 = 29.07, 2.99 + 11.74 + 3.42 = 18.15
    np.testing.assert_array_equal(got[0, :, 0], [76, 150, 29, 255, 18])
    assert (got == got[:, :, :1]).all()
    img = _random(4)
    pil = np.asarray(Image.fromarray(img).convert("L")).astype(int)
    assert np.abs(parse_perturbation("grayscale").apply(img)[:, :, 0].astype(int) - pil).max() <= 1


def test_steps_apply_in_order():
    img = _random(5)
    chain = parse_perturbation("exposure:-1,darken:0.5,gamma:1.2")
    want = perturb.gamma(perturb.darken(perturb.exposure(img, -1.0), 0.5), 1.2)
    np.testing.assert_array_equal(chain.apply(img), want)
    other = parse_perturbation("darken:0.5,exposure:-1,gamma:1.2")
    assert not np.array_equal(other.apply(img), chain.apply(img))
    np.testing.assert_array_equal(parse_perturbation("none").apply(img), img)


# ------------------------------------------------------------------ specs
def test_spec_is_canonical_hashable_and_round_trips():
    p = parse_perturbation(" Darken:0.50 , jpeg:75,grayscale")
    assert p == parse_perturbation("darken:0.5,jpeg:75,grayscale") and hash(p) == hash(parse_perturbation(p.canonical))
    assert p.canonical == "darken:0.5,jpeg:75,grayscale" and str(p) == p.canonical
    assert p.steps == (Step("darken", 0.5), Step("jpeg", 75), Step("grayscale"))
    assert parse_perturbation("exposure:-1").dirname == "exposure-m1.0"
    assert Perturbation().canonical == "none" == parse_perturbation("").canonical
    assert "sRGB values times 0.5" in p.words and "JPEG" in p.words
    with pytest.raises(Exception):
        p.steps = ()  # frozen


@pytest.mark.parametrize("bad", ["brighten:2", "darken", "darken:2", "darken:abc", "jpeg:7.5", "jpeg:0",
                                 "grayscale:1", "gamma:0", "noise:-1", "darken:0.5,none", "darken:0.5,,jpeg:9",
                                 "blur:inf"])
def test_bad_spec_is_one_line_listing_the_valid_ones(bad):
    with pytest.raises(ValueError) as err:
        parse_perturbation(bad)
    msg = str(err.value)
    assert "\n" not in msg and repr(bad) in msg
    for usage in ("darken:F", "exposure:EV", "gamma:G", "blur:SIGMA", "noise:SIGMA", "jpeg:Q", "grayscale", "none"):
        assert usage in msg


def test_sweep_list_parsing():
    assert [p.dirname for p in parse_sweep("darken:1.0,0.5,0.1")] == ["darken-1.0", "darken-0.5", "darken-0.1"]
    got = parse_sweep("none, darken:0.5, exposure:-1, -2, +1, grayscale+darken:0.5, jpeg:75, 50")
    assert [p.canonical for p in got] == ["none", "darken:0.5", "exposure:-1.0", "exposure:-2.0", "exposure:1.0",
                                          "grayscale,darken:0.5", "jpeg:75", "jpeg:50"]
    assert got[5].dirname == "grayscale+darken-0.5"
    for bad, why in (("0.5,darken:1", "follows no"), ("darken:0.5,0.50", "more than once"),
                     ("grayscale+darken:0.5,0.1", "follows no"), ("darken:1,,0.5", "empty item"),
                     ("darken:1,3", "out of range")):
        with pytest.raises(ValueError, match=why):
            parse_sweep(bad)


# ------------------------------------------------------------------ settings
def test_fingerprint_follows_the_pixels():
    base = ExtractSettings(data=Path("d"), out=Path("o"))
    fp = lambda s: fingerprint(s.fingerprint_fields())  # noqa: E731
    assert "perturb" not in base.fingerprint_fields()  # runs made before perturbations keep their fingerprint
    dark = replace(base, perturb=parse_perturbation("darken:0.5"))
    assert dark.fingerprint_fields()["perturb"] == "darken:0.5"
    assert len({fp(base), fp(dark), fp(replace(base, perturb=parse_perturbation("darken:0.1"))),
                fp(replace(base, perturb=parse_perturbation("darken:0.5,jpeg:90")))}) == 4
    assert fp(replace(base, perturb=parse_perturbation("darken:1.0"))) == fp(base)  # changes no pixel
    with pytest.raises(ValueError, match="drop --draft"):
        replace(base, draft=True, perturb=parse_perturbation("noise:4"), device="cpu").resolved()
    replace(base, draft=True, perturb=parse_perturbation("darken:0.5,blur:2"), device="cpu").resolved()
    with pytest.raises(ValueError, match="Perturbation"):
        replace(base, perturb="darken:0.5", device="cpu").resolved()


def test_draft_decode_blurs_in_original_pixels(tmp_path):
    from extractor.preprocess import load_prepared, prepare_image
    img = np.asarray(Image.fromarray(_random(6, (30, 40, 3))).resize((640, 480), Image.BILINEAR))
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    p = parse_perturbation("blur:4")
    got = load_prepared(tmp_path / "a.jpg", 64, 96, draft=True, perturbation=p)
    with Image.open(tmp_path / "a.jpg") as im:
        im.draft("RGB", (85, 64))
        im.load()
        decoded = np.asarray(im.convert("RGB"))
    scale = decoded.shape[1] / 640
    assert scale < 1  # the draft decode did shrink
    want = prepare_image(Image.fromarray(perturb.blur(decoded, 4 * scale)), 64, 96, orig_size=(640, 480))
    np.testing.assert_array_equal(got.pixels, want.pixels)
    assert got.orig_size == (640, 480)


# ------------------------------------------------------------------ perturbed runs
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from extractor.demo import write_demo
    return write_demo(tmp_path_factory.mktemp("perturb_demo") / "data", n_images=4, seed=1).root


def _load(run: Path) -> dict:
    return {"det": pd.read_parquet(run / rundir.DETECTIONS), "persons": pd.read_parquet(run / rundir.PERSONS),
            "images": pd.read_parquet(run / rundir.IMAGES), "emb": np.load(run / rundir.EMBEDDINGS),
            "manifest": json.loads((run / rundir.MANIFEST).read_text())}


def _assert_same_run(a: Path, b: Path) -> None:
    x, y = _load(a), _load(b)
    for key in ("det", "persons", "images"):
        pd.testing.assert_frame_equal(x[key], y[key])
    np.testing.assert_array_equal(x["emb"], y["emb"])
    assert x["manifest"]["settings_fingerprint"] == y["manifest"]["settings_fingerprint"]
    assert x["manifest"]["counts"] == y["manifest"]["counts"]


def _cli(*args: str) -> int:
    """``python -m extractor ARGS`` in this process (the model is tiny; a subprocess would cost an import of torch)."""
    from extractor.__main__ import main
    return main(list(args))


@pytest.mark.slow
def test_darkened_run_is_another_run_and_says_so(demo, tmp_path, capsys):
    from extractor.pipeline import run_extraction
    from ui.runs import describe_manifest
    plain = run_extraction(ExtractSettings(data=demo, out=tmp_path / "plain", **TINY))
    assert _cli("run", "--data", str(demo), "--out", str(tmp_path / "dark"), "--checkpoint", "none",
                "--min-size", "160", "--max-size", "192", "--perturb", "darken:0.5") == 0
    dark = _load(tmp_path / "dark")
    m = dark["manifest"]
    assert m["perturbation"]["spec"] == "darken:0.5" and m["settings"]["perturb"] == "darken:0.5"
    assert m["settings_fingerprint"] != plain.manifest["settings_fingerprint"]
    assert plain.manifest["perturbation"]["spec"] == "none"
    assert not np.allclose(np.load(plain.out / rundir.EMBEDDINGS)[:3], dark["emb"][:3])
    words = dict(describe_manifest(m))
    assert "sRGB values times 0.5" in words["Perturbation"]
    # the same directory with another perturbation is another run: refused without --overwrite
    with pytest.raises(ValueError, match="other settings"):
        run_extraction(ExtractSettings(data=demo, out=tmp_path / "dark", **TINY, perturb=parse_perturbation("darken:0.1")))
    capsys.readouterr()
    assert _cli("run", "--data", str(demo), "--out", str(tmp_path / "x"), "--checkpoint", "none", "--perturb",
                "darkn:0.5") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad perturbation 'darkn:0.5'") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_noisy_run_resumes_to_the_same_files(demo, tmp_path):
    from extractor.pipeline import run_extraction
    s = ExtractSettings(data=demo, out=tmp_path / "clean", **TINY, shard_size=2, perturb=parse_perturbation("noise:12"))
    run_extraction(s)

    def stop_after_first_shard(done, total):
        raise KeyboardInterrupt

    resumed = replace(s, out=tmp_path / "resumed", workers=1)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(resumed, progress=stop_after_first_shard)
    assert not (resumed.out / rundir.MANIFEST).exists()
    result = run_extraction(resumed)
    assert result.resumed_shards == 1 and result.processed_shards == 1  # 4 images, shards of 2
    _assert_same_run(s.out, resumed.out)


@pytest.mark.slow
def test_sweep_equals_the_individual_runs(demo, tmp_path):
    from extractor.pipeline import run_extraction
    from extractor.sweep import run_sweep
    assert _cli("sweep", "--data", str(demo), "--out", str(tmp_path / "sweep"), "--checkpoint", "none",
                "--min-size", "160", "--max-size", "192", "--perturb", "darken:1.0,0.5,exposure:-2") == 0
    sweep = tmp_path / "sweep"
    listed = json.loads((sweep / "sweep.json").read_text())["runs"]
    assert [r["dir"] for r in listed] == ["darken-1.0", "darken-0.5", "exposure-m2.0"]
    assert sorted(p.name for p in sweep.iterdir()) == ["darken-0.5", "darken-1.0", "exposure-m2.0", "sweep.json"]
    for spec, name in (("darken:0.5", "darken-0.5"), ("exposure:-2", "exposure-m2.0")):
        alone = run_extraction(ExtractSettings(data=demo, out=tmp_path / name, **TINY, perturb=parse_perturbation(spec)))
        _assert_same_run(alone.out, sweep / name)
    plain = run_extraction(ExtractSettings(data=demo, out=tmp_path / "plain", **TINY))
    _assert_same_run(plain.out, sweep / "darken-1.0")  # darken:1.0 changes no pixel: the plain run
    # run again: every run is complete, nothing is redone
    again = run_sweep(ExtractSettings(data=demo, out=sweep, **TINY), parse_sweep("darken:1.0,0.5,exposure:-2"))
    assert [r.processed_shards for r in again] == [0, 0, 0] and [r.out.name for r in again] == [r["dir"] for r in listed]


def test_app_says_the_photo_query_is_not_perturbed():
    from ui.runs import describe_manifest, perturbation_note
    dark = parse_perturbation("darken:0.5")
    m = {"perturbation": dark.to_manifest(), "settings": {"perturb": dark.effective.canonical}}
    assert "sRGB values times 0.5" in perturbation_note(m) and "not" in perturbation_note(m)
    assert "`darken:0.5`" in dict(describe_manifest(m))["Perturbation"]
    same = parse_perturbation("darken:1.0")
    assert perturbation_note({"perturbation": same.to_manifest(), "settings": {}}) is None
    assert perturbation_note({"settings": {}}) is None  # a run from before perturbations
    assert "Perturbation" not in dict(describe_manifest({}))
    assert dict(describe_manifest({"perturbation": Perturbation().to_manifest()}))["Perturbation"].startswith("none")


def test_the_app_lists_the_runs_of_a_sweep(tmp_path):
    from ui.runs import list_runs, runs_table, unfinished_runs
    root = tmp_path / "runs"
    manifest = {"status": "complete", "perturbation": parse_perturbation("darken:0.5").to_manifest()}
    for d in ("plain", "darkness/darken-0.5", "notes/inner"):
        (root / d).mkdir(parents=True)
        rundir.write_json(root / d / rundir.MANIFEST, manifest)
    rundir.write_json(root / "darkness" / rundir.SWEEP_FILE, {"runs": []})
    (root / "darkness" / "darken-0.1" / rundir.WORK_DIR).mkdir(parents=True)
    entries = list_runs(root)
    assert [e.name for e in entries] == ["darkness/darken-0.5", "plain"]  # a folder without sweep.json is not looked into
    assert entries[0].path == root / "darkness" / "darken-0.5"
    assert unfinished_runs(root) == ["darkness/darken-0.1"]
    assert runs_table(entries)["perturbation"].tolist() == ["darken:0.5", "darken:0.5"]


@pytest.mark.slow
def test_app_pages_say_the_perturbation(ui_demo, tmp_path, monkeypatch):
    import shutil
    from streamlit.testing.v1 import AppTest
    run = tmp_path / "runs" / "darkness" / "darken-0.5"
    shutil.copytree(ui_demo.run_dir, run)
    rundir.write_json(run.parent / rundir.SWEEP_FILE, {"runs": [{"dir": "darken-0.5"}]})
    m = json.loads((run / rundir.MANIFEST).read_text())
    dark = parse_perturbation("darken:0.5")
    m["perturbation"], m["settings"]["perturb"] = dark.to_manifest(), dark.effective.canonical
    rundir.write_json(run / rundir.MANIFEST, m)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"), default_timeout=180)
    at.run()
    at.switch_page("ui/pages/overview.py").run()
    assert not at.exception and at.query_params.get("run") == "darkness/darken-0.5"
    assert any("**Perturbation:** sRGB values times 0.5" in md.value for md in at.markdown)
    at.switch_page("ui/pages/similar.py").run()
    assert not at.exception
    assert any("The query photo is not" in i.value for i in at.info)
