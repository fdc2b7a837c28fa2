import pytest

from models.physics import SpecError, from_spec, parse_spec

BAD = [
    ({"modality": "xray", "image_size": 64}, "modality: must be one of"),
    ({"modality": "ct", "image_size": 64}, "n_views"),
    ({"modality": "ct", "image_size": 4, "n_views": 10}, "image_size"),
    ({"modality": "ct", "image_size": 64, "n_views": 0}, "n_views"),
    (
        {"modality": "ct", "image_size": 64, "n_views": 10, "geometry": "cone"},
        "geometry: must be one of",
    ),
    ({"modality": "ct", "image_size": 64, "n_views": 10, "geometry": "fan"}, "source_distance"),
    (
        {
            "modality": "ct",
            "image_size": 64,
            "n_views": 10,
            "geometry": "fan",
            "source_distance": 20,
            "detector_distance": 10,
        },
        "half-diagonal",
    ),
    ({"modality": "ct", "image_size": 64, "angles": []}, "angles"),
    (
        {
            "modality": "ct",
            "image_size": 64,
            "n_views": 10,
            "mask": {"kind": "random", "acceleration": 4},
        },
        "'mri' only",
    ),
    ({"modality": "ct", "image_size": 64, "n_views": 10, "noise_std": -1}, "noise_std"),
    (
        {"modality": "ct", "image_size": 64, "n_views": 10, "detector_spacing": 0},
        "detector_spacing",
    ),
    ({"modality": "ct", "image_size": 64, "n_views": 10, "bogus": 1}, "bogus: unknown field"),
    ({"modality": "mri", "image_size": 64}, "MRI needs mask"),
    (
        {"modality": "mri", "image_size": 64, "mask": {"kind": "spiral"}},
        "mask.kind: must be one of",
    ),
    (
        {"modality": "mri", "image_size": 64, "mask": {"kind": "equispaced"}},
        "mask.acceleration is required",
    ),
    ({"modality": "mri", "image_size": 64, "mask": {"kind": "explicit"}}, "mask.lines is required"),
    (
        {"modality": "mri", "image_size": 64, "mask": {"kind": "explicit", "lines": [1, 99]}},
        "mask.lines must be in",
    ),
    (
        {"modality": "mri", "image_size": 64, "mask": {"kind": "equispaced", "acceleration": 0.5}},
        "mask.acceleration",
    ),
    (
        {
            "modality": "mri",
            "image_size": 64,
            "n_views": 3,
            "mask": {"kind": "equispaced", "acceleration": 4},
        },
        "'ct' only",
    ),
]


@pytest.mark.parametrize("spec,fragment", BAD)
def test_invalid_spec_names_the_field(spec, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert fragment in str(info.value)


def test_bad_json_and_incompatible_full_views():
    with pytest.raises(SpecError, match="invalid measurement spec"):
        parse_spec(b"{not json")
    with pytest.raises(SpecError, match="n_full_views"):
        from_spec({"modality": "ct", "image_size": 32, "n_views": 7, "n_full_views": 180})


def test_interface_examples_build():
    assert (
        from_spec(
            {"modality": "ct", "geometry": "parallel", "image_size": 128, "n_views": 23}
        ).measurement_shape()[1]
        == 23
    )
    mri = from_spec(
        {
            "modality": "mri",
            "image_size": 128,
            "mask": {"kind": "equispaced", "acceleration": 8, "center_fraction": 0.04},
        }
    )
    assert mri.measurement_shape() == (1, 128, 16)
