import json

import numpy as np

from models.cli import main


def test_train_sample_likelihood_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    g = np.random.default_rng(0)
    for i in range(6):
        img = np.zeros((16, 16), np.float32)
        img[4 + i % 3 : 10, 3:12] = 0.8
        np.save(data / f"img{i}.npy", np.clip(img + 0.02 * g.standard_normal((16, 16)), 0, 1))
    (data / "broken.npy").write_bytes(b"not an array")
    model = tmp_path / "model"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(model),
                "--preset",
                "tiny",
                "--image-size",
                "16",
                "--steps",
                "4",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    card = json.loads((model / "card.json").read_text())
    assert card["n_images"] == 5 and card["steps"] == 4 and card["sde"]["kind"] == "ve"
    assert len(card["training_data"]["validation_volumes"]) == 1  # split by volume
    out = capsys.readouterr().out
    assert "skipped" in out and "broken.npy" in out and "pickled" in out
    for sampler in ("pc", "ode", "ald"):
        grid = tmp_path / f"{sampler}.png"
        assert (
            main(
                [
                    "sample",
                    "--model",
                    str(model),
                    "--n",
                    "4",
                    "--sampler",
                    sampler,
                    "--steps",
                    "5",
                    "--out",
                    str(grid),
                ]
            )
            == 0
        )
        assert grid.exists() and np.load(grid.with_suffix(".npy")).shape == (4, 1, 16, 16)
    capsys.readouterr()
    assert main(["likelihood", "--model", str(model), "--data", str(data), "--steps", "5"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(report["bits_per_dim"]) and report["n"] == 6


def test_train_on_empty_folder_is_explained(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "no readable" in capsys.readouterr().err
