"""Evaluation: the Frechet distance against a scipy reference, the ADM .npz layouts, FD-digits, and FID/IS
end to end through `dumo-ray evaluate` with a randomly initialised Inception network saved to a local file
(the real weights cannot be downloaded here)."""
import json

import numpy as np
import pytest
import torch
from scipy import linalg

from dumo_ray.cli import main
from dumo_ray.eval.features import INCEPTION_FILE
from dumo_ray.eval.image_sets import SampleBatchWriter, iter_image_batches, load_reference, save_reference
from dumo_ray.eval.metrics import feature_statistics, frechet_distance


def scipy_reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook FID computation (as in pytorch-fid / the ADM evaluator): scipy's sqrtm of S1 S2."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_equals_the_scipy_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 16))
    b = rng.normal(loc=0.3, size=(2000, 16)) @ rng.normal(scale=0.5, size=(16, 16))
    ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert ours == pytest.approx(scipy_reference_fd(a, b), rel=1e-8)
    assert ours > 1.0


def test_frechet_distance_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(32, 32))
    draw = lambda: rng.normal(size=(50_000, 32)) @ mix
    a, b = feature_statistics(draw()), feature_statistics(draw())
    assert 0 < frechet_distance(*a, *b) < 1e-3 * np.trace(a[1])  # only the sampling error of 50,000 draws
    same = draw()
    assert abs(frechet_distance(*feature_statistics(same), *feature_statistics(same))) < 1e-6


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64))  # 10 samples in 64 dimensions: rank 9
    value = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert np.isfinite(value) and value > 0


def test_inception_score_is_never_below_one():
    """IS = exp(mean KL) >= 1. Identical predictions (KL = 0) land a rounding error either side of 1 in
    floating point (0.9999999999999999 for these logits); the reported score is clamped at 1."""
    from dumo_ray.eval.scores import inception_score

    for seed in range(6):
        logits = np.tile(np.random.default_rng(seed).normal(size=10) * 3, (24, 1))
        score, _ = inception_score(logits)
        assert 1.0 <= score <= 1.0 + 1e-12, (seed, score)


def test_adm_npz_layouts_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=8), np.cov(rng.normal(size=(100, 8)), rowvar=False)
    save_reference(tmp_path / "ref.npz", mu, sigma)
    loaded = load_reference(tmp_path / "ref.npz")
    assert np.array_equal(loaded[0], mu) and np.array_equal(loaded[1], sigma)

    images = rng.integers(0, 256, size=(10, 6, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=10)
    writer = SampleBatchWriter(tmp_path / "s.npz", 10, (6, 6, 3))
    order = rng.permutation(10)  # rows arrive in any order
    writer.write(order[:4], images[order[:4]], labels[order[:4]])
    writer.write(order[4:], images[order[4:]], labels[order[4:]])
    writer.close()
    with np.load(tmp_path / "s.npz") as data:  # what the ADM evaluator reads
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    batches = list(iter_image_batches(tmp_path / "s.npz", batch_size=4))
    assert [len(b) for b, _ in batches] == [4, 4, 2]
    assert np.array_equal(torch.cat([b for b, _ in batches]).permute(0, 2, 3, 1).numpy(), images)
    assert np.array_equal(np.concatenate([l for _, l in batches]), labels)
    assert load_reference(tmp_path / "s.npz") is None  # images only: statistics get computed

    unfinished = SampleBatchWriter(tmp_path / "u.npz", 3, (2, 2, 1))
    unfinished.write(np.array([0]), np.zeros((1, 2, 2, 1), np.uint8), np.array([0]))
    with pytest.raises(RuntimeError, match="2 samples were never written"):
        unfinished.close()


def real_digits_npz(path):
    from dumo_ray.data.digits import load_digits_arrays

    images, labels = load_digits_arrays()
    pixels = np.round(images * (255 / 16)).astype(np.uint8)[..., None]
    writer = SampleBatchWriter(path, len(pixels), pixels.shape[1:])
    writer.write(np.arange(len(pixels)), pixels, labels)
    return writer.close()


def test_fd_digits_of_the_real_digits(tmp_path, capsys):
    samples = real_digits_npz(tmp_path / "real.npz")
    assert main(["evaluate", "--samples", str(samples), "--features", "digits", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_samples"] == 1797 and abs(result["fd"]) < 1e-3 and result["accuracy"] > 0.97
    # Noise is far from the digits and is not classified.
    rng = np.random.default_rng(0)
    writer = SampleBatchWriter(tmp_path / "noise.npz", 500, (8, 8, 1))
    writer.write(np.arange(500), rng.integers(0, 256, size=(500, 8, 8, 1), dtype=np.uint8), np.arange(500) % 10)
    writer.close()
    assert main(["evaluate", "--samples", str(tmp_path / "noise.npz"), "--features", "digits", "--json", str(tmp_path / "n.json")]) == 0
    noise = json.loads((tmp_path / "n.json").read_text())
    assert noise["fd"] > 100 * max(result["fd"], 1.0) and noise["accuracy"] < 0.5


def test_a_latent_folder_is_a_reference_of_its_original_images(digits_latents, tmp_path):
    """A precomputed folder used as --reference decodes its stored (raw) moments as they are: the statistics
    equal those of the 400 original digits it was written from (uint8 -> fp16 -> uint8 is exact)."""
    from dumo_ray.data.digits import load_digits_arrays
    from dumo_ray.eval.evaluate import reference_statistics
    from dumo_ray.eval.features import build_feature_network

    network = build_feature_network("digits")
    mu, sigma = reference_statistics(network, digits_latents)
    images, _ = load_digits_arrays()
    originals = torch.from_numpy(np.round(images[:400] * (255 / 16)).astype(np.uint8))[:, None]
    direct_mu, direct_sigma = feature_statistics(network(originals)["features"])
    np.testing.assert_allclose(mu, direct_mu, rtol=0, atol=1e-9)
    np.testing.assert_allclose(sigma, direct_sigma, rtol=0, atol=1e-9)
    samples = real_digits_npz(tmp_path / "real.npz")
    assert main(["evaluate", "--samples", str(samples), "--features", "digits", "--reference", str(digits_latents),
                 "--json", str(tmp_path / "r.json")]) == 0
    all_mu, all_sigma = feature_statistics(network(torch.from_numpy(np.round(images * (255 / 16)).astype(np.uint8))[:, None])["features"])
    expected = frechet_distance(all_mu, all_sigma, direct_mu, direct_sigma)  # all 1,797 digits against their first 400
    assert json.loads((tmp_path / "r.json").read_text())["fd"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_without_inception_weights_names_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DUMO_INCEPTION_WEIGHTS", raising=False)
    samples = real_digits_npz(tmp_path / "s.npz")
    assert main(["evaluate", "--samples", str(samples), "--reference", str(samples)]) == 2
    err = capsys.readouterr().err
    assert INCEPTION_FILE in err and "DUMO_INCEPTION_WEIGHTS" in err and "--inception-weights" in err
    assert main(["evaluate", "--samples", str(samples), "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """torchmetrics' FID Inception with random weights, saved as the local weights file users would give."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    class Untrained(NoTrainInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pth")
    torch.manual_seed(0)
    net = Untrained(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(root / "empty.pth"))
    torch.save(net.state_dict(), root / INCEPTION_FILE)
    return root / INCEPTION_FILE


@pytest.mark.slow
def test_fid_and_inception_score_end_to_end(tmp_path, random_inception_weights, monkeypatch):
    from PIL import Image

    from dumo_ray.digests import file_sha256

    # Random weights, not the official file: accepted by naming their digest (the official one is pinned).
    monkeypatch.setenv("DUMO_INCEPTION_SHA256", file_sha256(random_inception_weights))
    from torchmetrics.image.fid import FrechetInceptionDistance

    n = 6  # Inception runs at 299 x 299 on the CPU; batches of 4 still leave a short last batch
    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    real = np.clip(rng.normal(128, 30, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
    writer = SampleBatchWriter(tmp_path / "samples.npz", n, (32, 32, 3))
    writer.write(np.arange(n), fake, np.zeros(n, dtype=np.int64))
    writer.close()
    (tmp_path / "real").mkdir()
    for i, image in enumerate(real):
        Image.fromarray(image).save(tmp_path / "real" / f"{i:03d}.png")

    args = ["evaluate", "--samples", str(tmp_path / "samples.npz"), "--inception-weights", str(random_inception_weights),
            "--batch-size", "4"]
    assert main([*args, "--reference", str(tmp_path / "real"), "--save-reference", str(tmp_path / "ref.npz"),
                 "--json", str(tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["num_samples"] == n and first["fd"] > 0 and first["inception_score"] >= 1.0

    # torchmetrics' own FID on the same images and the same weights agrees.
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(random_inception_weights),
                                      antialias=False)
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    assert first["fd"] == pytest.approx(float(metric.compute()), rel=1e-3)

    # The saved reference statistics (ADM layout) give the same FID without the images.
    mu, sigma = load_reference(tmp_path / "ref.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert main([*args, "--reference", str(tmp_path / "ref.npz"), "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["fd"] == pytest.approx(first["fd"], rel=1e-9)
