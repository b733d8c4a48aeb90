"""Latent precompute on a real local Ray, a real (tiny) AutoencoderKL loaded with from_pretrained, real
Parquet files, and a folder of good and bad images."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dumo_ray.data.codec import CODEC_FILE, LatentCodec
from dumo_ray.data.images import load_image
from dumo_ray.config import DataConfig
from dumo_ray.data.latents import MANIFEST, load_manifest, moments_array, moments_table, read_shard, shard_name, write_shard_table
from dumo_ray.data.loader import latent_dataset
from dumo_ray.data.verify import verify_latents
from dumo_ray.vae import encode_moments, encode_moments_in_chunks, in_fixed_chunks, load_vae
from dumo_ray.pipelines.precompute_latents import precompute_latents, precompute_pixels_in_process

GOOD = ["cat/photo.jpg", "cat/gray.png", "cat/rgba.png", "dog/cmyk.jpg", "dog/wide.jpg", "dog/palette.gif", "dog/sub/deep.png"]
BAD = {"cat/truncated.jpg": "cannot decode", "cat/empty.jpg": "empty file", "dog/notes.txt": "cannot decode",
       "dog/huge.png": "too large"}


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)

    def save(rel, image, **kw):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kw)

    save("cat/photo.jpg", Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)))
    save("cat/gray.png", Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8), mode="L"))
    save("cat/rgba.png", Image.fromarray(rng.integers(0, 255, (18, 18, 4), dtype=np.uint8), mode="RGBA"))
    save("dog/cmyk.jpg", Image.fromarray(rng.integers(0, 255, (25, 25, 3), dtype=np.uint8)).convert("CMYK"))
    save("dog/wide.jpg", Image.fromarray(rng.integers(0, 255, (600, 2000, 3), dtype=np.uint8)))
    save("dog/palette.gif", Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("P"))
    save("dog/sub/deep.png", Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    save("dog/huge.png", Image.new("1", (9000, 8000)))  # 72M pixels: skipped before decoding
    (root / "cat/empty.jpg").write_bytes(b"")
    (root / "dog/notes.txt").write_text("not an image")
    jpeg = (root / "cat/photo.jpg").read_bytes()
    (root / "cat/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return root


def all_rows(folder):
    manifest = load_manifest(folder)
    shards = [read_shard(folder / s["file"]) for s in manifest["shards"]]
    return manifest, {k: np.concatenate([s[k] for s in shards]) if k != "key" else sum((s["key"] for s in shards), [])
                      for k in ("key", "label", "flip", "moments")}


def encode_tree(image_tree, vae, out, batch_size, resolution=16):
    """The pipeline run these tests share the settings of: mirrored rows, 3 rows per shard."""
    return precompute_latents(str(image_tree), str(out), vae=vae, resolution=resolution, flip=True, shard_size=3,
                              batch_size=batch_size)


@pytest.fixture(scope="module")
def encoded(local_ray, tiny_vae, image_tree, tmp_path_factory):
    """The image tree precomputed once through the pipeline (encoder batches of 4 rows): (folder, summary).
    Tests that change the folder work on a copy."""
    out = tmp_path_factory.mktemp("encoded") / "latents"
    return out, encode_tree(image_tree, tiny_vae, out, batch_size=4)


@pytest.mark.ray
@pytest.mark.slow
def test_precompute_encodes_good_images_lists_bad_ones_and_resumes(encoded, tiny_vae, image_tree, tmp_path, capsys):
    import shutil

    out, summary = tmp_path / "latents", encoded[1]
    shutil.copytree(encoded[0], out)
    manifest, rows = all_rows(out)

    # Good images encoded twice (plain + mirrored), bad ones listed with their reason.
    assert sorted(set(rows["key"])) == sorted(GOOD)
    assert manifest["rows"] == 2 * len(GOOD) == len(rows["key"])
    assert sorted((k, bool(f)) for k, f in zip(rows["key"], rows["flip"])) == sorted((k, f) for k in GOOD for f in (False, True))
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(BAD)
    for key, reason in BAD.items():
        assert reasons[key].startswith(reason), (key, reasons[key])
    assert summary["skipped"] == len(BAD) and summary["encoded_now"] == len(GOOD)
    assert manifest["classes"] == ["cat", "dog"] and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["vae"]["id"] == tiny_vae and len(manifest["shards"]) == 4  # 11 files / 3 per shard
    assert {k: int(l) for k, l in zip(rows["key"], rows["label"])}["dog/sub/deep.png"] == 1

    # The stored moments are the VAE posterior of the center-cropped image (fp16 storage).
    vae = load_vae(tiny_vae)
    pixels, _ = load_image(image_tree / "cat/photo.jpg", 16)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    for flipped, image in [(False, x), (True, torch.flip(x, dims=[3]))]:
        mean, std = encode_moments(vae, image)
        i = [j for j, (k, f) in enumerate(zip(rows["key"], rows["flip"])) if k == "cat/photo.jpg" and f == flipped][0]
        np.testing.assert_allclose(rows["moments"][i, 0], mean[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(rows["moments"][i, 1], std[0].numpy(), rtol=2e-3, atol=2e-3)

    # Manifest statistics equal a direct computation over all stored rows.
    m = rows["moments"].astype(np.float64)
    direct_mean = m[:, 0].mean(axis=(0, 2, 3))
    direct_std = np.sqrt((m[:, 0] ** 2 + m[:, 1] ** 2).mean(axis=(0, 2, 3)) - direct_mean ** 2)
    np.testing.assert_allclose(manifest["latent_stats"]["mean"], direct_mean, rtol=1e-9)
    np.testing.assert_allclose(manifest["latent_stats"]["std"], direct_std, rtol=1e-9)
    # Beside the manifest, the codec a model trained on this folder decodes with (per-channel statistics).
    codec = LatentCodec.load(out / CODEC_FILE)
    assert codec == LatentCodec.from_manifest(manifest) and codec.vae == tiny_vae and codec.latent_shape == (4, 8, 8)
    z = torch.from_numpy(rows["moments"][:, 0].astype(np.float32))
    normalized = codec.normalize(z).double()
    np.testing.assert_allclose(normalized.mean(dim=(0, 2, 3)), 0, atol=1e-5)  # each channel centred...
    np.testing.assert_allclose(codec.denormalize(codec.normalize(z)), z, rtol=1e-5, atol=1e-5)  # ...and back

    # The trainer's Ray Data read gives the moments as tensors with their shape (in shard order, like
    # read_shard); plain pyarrow sees the shape in the file metadata.
    ds, *_ = latent_dataset(DataConfig(path=str(out), cache="never"))
    batch = ds.take_batch(batch_size=100, batch_format="numpy")
    np.testing.assert_array_equal(batch["moments"], rows["moments"])
    assert json.loads(pq.read_schema(out / manifest["shards"][0]["file"]).metadata[b"dumo_ray.moments_shape"]) == [2, 4, 8, 8]
    assert verify_latents(out, preview=tmp_path / "preview.png")["problems"] == []
    assert Image.open(tmp_path / "preview.png").width > 16

    # Interrupted run: one shard lost (and a partial temp file left behind) -> the rerun redoes only it, with
    # encoder batches of another size (16 rows: the shard holds 3) and the same bytes again.
    lost = out / manifest["shards"][1]["file"]
    lost.unlink()
    lost.with_suffix(".json").unlink()
    (out / f".tmp-{lost.name}-999").write_bytes(b"partial")
    capsys.readouterr()
    encode_tree(image_tree, tiny_vae, out, batch_size=16)
    assert "3 already done, 1 to do" in capsys.readouterr().out
    manifest2, rows2 = all_rows(out)
    pairs = [(k, bool(f)) for k, f in zip(rows2["key"], rows2["flip"])]
    assert len(pairs) == len(set(pairs)) == 2 * len(GOOD)
    assert manifest2["shards"] == manifest["shards"]  # deterministic: the same bytes again (SHA-256 per shard)

    # A rerun with other settings is refused rather than mixing two datasets; so is one that would add
    # shards of another schema.
    with pytest.raises(ValueError, match="different settings .*resolution"):
        encode_tree(image_tree, tiny_vae, out, batch_size=4, resolution=32)
    settings = out / "precompute.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "schema_version"}))
    with pytest.raises(ValueError, match="shard schema 1, this dumo-ray writes schema 2"):
        encode_tree(image_tree, tiny_vae, out, batch_size=4)

    # verify-latents notices a corrupted shard.
    path = out / manifest["shards"][0]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert any("checksum" in p for p in verify_latents(out)["problems"])


@pytest.mark.ray
@pytest.mark.slow
def test_shard_bytes_do_not_depend_on_how_ray_data_batches_the_rows(encoded, tiny_vae, image_tree, tmp_path):
    """Encoder batches of 1 row and of 4 give byte-identical shards (and the resume above redoes one with
    16): the VAE always runs on ENCODE_CHUNK images, so the kernels' summation order never changes."""
    encode_tree(image_tree, tiny_vae, tmp_path / "small", batch_size=1)
    small, reference = load_manifest(tmp_path / "small")["shards"], load_manifest(encoded[0])["shards"]
    assert len(small) == 4 and [s["sha256"] for s in small] == [s["sha256"] for s in reference]


def test_chunked_encoding_gives_each_image_the_same_bits_in_any_batch(tiny_vae):
    """The reason for the chunks, on the real VAE: the same images split 1 + 3 + 7 or encoded together."""
    vae = load_vae(tiny_vae)
    images = torch.rand(11, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    together = encode_moments_in_chunks(vae, images)
    split = [encode_moments_in_chunks(vae, images[a:b]) for a, b in [(0, 1), (1, 4), (4, 11)]]
    for i in range(2):
        assert torch.equal(torch.cat([part[i] for part in split]), together[i])
    assert torch.equal(in_fixed_chunks(lambda x: (x * len(x),), images, 4)[0], images * 4)  # padded to 4 rows


@pytest.mark.ray
def test_digits_tree_in_pixel_space(local_ray, tmp_path):
    from dumo_ray.data.digits import load_digits_arrays, write_digits_tree

    assert write_digits_tree(tmp_path / "digits", limit=40) == 40
    precompute_latents(str(tmp_path / "digits"), str(tmp_path / "px"), vae=None, resolution=8, mode="L", shard_size=16)
    manifest, rows = all_rows(tmp_path / "px")
    assert manifest["rows"] == 40 and manifest["latent_shape"] == [1, 8, 8] and manifest["skipped"] == []
    images, labels = load_digits_arrays()
    i = rows["key"].index("3/0003.png")
    expected = np.round(images[3] * 255 / 16) / 127.5 - 1
    np.testing.assert_allclose(rows["moments"][i, 0, 0], expected, atol=2e-3)
    assert int(rows["label"][i]) == labels[3] and np.all(rows["moments"][:, 1] == 0)
    # Without Ray (tests, the GPU benchmark), the same stages in one process write the same shard bytes.
    local = precompute_pixels_in_process(tmp_path / "digits", tmp_path / "px-local", resolution=8, shard_size=16)
    assert [s["sha256"] for s in local["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert local["latent_stats"] == manifest["latent_stats"] and local["rows"] == 40


@pytest.mark.ray
def test_missing_vae_is_a_clear_error(local_ray, image_tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load the VAE"):
        precompute_latents(str(image_tree), str(tmp_path / "o"), vae=str(tmp_path / "no-such-vae"), resolution=16)


@pytest.mark.ray
@pytest.mark.parametrize("schema", [1, 2])
def test_training_reads_both_shard_schemas(local_ray, tmp_path, schema):
    """Schema 2 (one fixed-size binary value a row) is what precompute writes; schema 1 shards (Ray's
    tensor extension) from earlier versions still read, through read_shard and the trainer's Ray Data read,
    with and without the mirrored rows."""
    from ray.data.extensions import ArrowTensorArray

    moments = np.random.default_rng(0).normal(size=(10, 2, 4, 3, 3)).astype(np.float16)
    labels, flips = np.arange(10), np.arange(10) % 2 == 1
    table = moments_table([f"k{i}" for i in range(10)], labels, flips, moments)
    np.testing.assert_array_equal(moments_array(table.column("moments").slice(3, 4), (2, 4, 3, 3)), moments[3:7])
    if schema == 1:
        table = table.set_column(3, "moments", ArrowTensorArray.from_numpy(moments))
    shards = []
    for index, (start, stop) in enumerate([(0, 6), (6, 10)]):
        write_shard_table(table.slice(start, stop - start), tmp_path / shard_name(index, 2))
        shards.append({"file": shard_name(index, 2), "rows": stop - start})
    (tmp_path / MANIFEST).write_text(json.dumps({
        "schema_version": schema, "rows": 10, "images": 5, "flip": True, "shards": shards, "latent_shape": [4, 3, 3],
        "moments_shape": [2, 4, 3, 3], "latent_stats": {"mean": [0.0] * 4, "std": [1.0] * 4}}))

    stored = np.concatenate([read_shard(tmp_path / s["file"])["moments"] for s in shards])
    np.testing.assert_array_equal(stored, moments)
    for use_flips, keep in [(True, np.ones(10, bool)), (False, ~flips)]:
        ds, _, rows, _ = latent_dataset(DataConfig(path=str(tmp_path), use_flips=use_flips, cache="never"))
        batch = ds.take_batch(batch_size=100, batch_format="numpy")
        assert rows == keep.sum()
        np.testing.assert_array_equal(batch["moments"], moments[keep])
        np.testing.assert_array_equal(batch["label"], labels[keep])


def test_unknown_schema_is_a_clear_error(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 3}))
    with pytest.raises(ValueError, match="schema version 3, this dumo-ray reads 1 and 2"):
        load_manifest(tmp_path)


def test_verify_latents_of_an_empty_folder_is_a_clear_problem(tmp_path, capsys):
    """A folder of 0 rows (every file skipped) is reported as such, with the skip reasons, and exits 1; it used
    to crash on reshaping an empty array."""
    from conftest import undecodable_tree
    from dumo_ray.cli import main

    out = tmp_path / "latents"
    manifest = precompute_pixels_in_process(undecodable_tree(tmp_path / "tree"), out, resolution=8)  # the precompute's own writers
    assert manifest["rows"] == 0 and len(manifest["shards"]) == 1
    report = verify_latents(out, preview=tmp_path / "preview.png")
    problem = ("the folder holds no latents (0 rows): every file was skipped (3 files skipped: 2 x cannot decode: "
               "UnidentifiedImageError: cannot identify image file (e.g. a/notes.png), 1 x empty file (e.g. b/empty.png))")
    assert report == {"problems": [problem], "rows": 0, "shards": 1, "preview": None}
    assert not (tmp_path / "preview.png").exists()
    assert main(["verify-latents", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"problem: {problem}" in printed and "0 rows, 1 problems; preview none (no rows)" in printed
