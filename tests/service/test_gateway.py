"""The gateway through HTTP on SQLite and PostgreSQL: job life, validation, idempotency,
pagination, cancellation, the auth matrix and the audit trail."""

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.physics import from_spec
from models.physics.mri import calibration_lines
from tests.service.conftest import CT_SPEC, METRICS_TOKEN, auth, ct_measurement, tiny_model


def submit(client, key, data=None, spec=CT_SPEC, headers=None, **form):
    files = {"measurement": ("y.npy", data if data is not None else ct_measurement())}
    fields = {"spec": spec, "model": "tiny32", "nfe": "6", "sampler": "fast", **form}
    return client.post(
        "/v1/reconstructions", files=files, data=fields, headers={**auth(key), **(headers or {})}
    )


def wait(client, key, job_id, timeout=180):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.get(f"/v1/jobs/{job_id}", headers=auth(key))
        assert r.status_code == 200, r.text
        job = r.json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_job_life_from_submit_to_results(gateway):
    client, keys, _ = gateway
    source = '{"PatientID": "P-1", "StudyInstanceUID": "1.2.3.4", "SeriesInstanceUID": "1.2.3.5"}'
    r = submit(client, keys["alice"], samples="2", source=source)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and r.headers["Location"] == f"/v1/jobs/{job['id']}"
    done = wait(client, keys["alice"], job["id"])
    assert done["state"] == "succeeded", done.get("error")
    assert done["progress"]["fraction"] == 1.0 and done["attempts"] == 1
    npy = client.get(done["links"]["result_npy"], headers=auth(keys["alice"]))
    assert np.load(io.BytesIO(npy.content)).shape == (1, 1, 32, 32)
    png = client.get(done["links"]["result_png"], headers=auth(keys["alice"]))
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    report = client.get(done["links"]["result_json"], headers=auth(keys["alice"])).json()
    assert report["nfe"] == 6 and report["provenance"]["samples"] == 2
    assert "result_phase" not in done["links"]  # a CT image has no phase
    r = client.get(f"/v1/jobs/{job['id']}/result?format=phase", headers=auth(keys["alice"]))
    assert r.status_code == 404 and r.json()["field"] == "format"
    assert client.get(done["links"]["result_npy"], headers=auth(keys["bob"])).status_code == 404
    dicom = client.get(done["links"]["result_dicom"], headers=auth(keys["alice"]))
    assert dicom.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(dicom.content)) as z:
        instances = [pydicom.dcmread(io.BytesIO(z.read(n))) for n in z.namelist()]
    assert len(instances) == 2  # the reconstruction and its uncertainty series
    assert len({d.SeriesInstanceUID for d in instances}) == 2
    assert {d.StudyInstanceUID for d in instances} == {"1.2.3.4"}
    assert instances[0].PatientID == "P-1" and instances[0].Modality == "CT"
    # A series UID alone names no instance: nothing to reference (a reference must name
    # instances), and the positions are not the source's, so no borrowed frame either.
    assert "ReferencedSeriesSequence" not in instances[0]
    assert "positions are nominal" in instances[0].ImageComments


def test_bad_source_attributes_are_refused(gateway):
    client, keys, _ = gateway
    r = submit(client, keys["alice"], source='{"PatientsPet": "cat"}')
    assert r.status_code == 422 and "unknown attributes" in r.json()["detail"]
    r = submit(client, keys["alice"], source="[1]")
    assert r.status_code == 422 and r.json()["field"] == "source"


@pytest.mark.parametrize(
    "kwargs,status,field,message",
    [
        ({"spec": '{"modality": "ct", "image_size": 32}'}, 422, "spec", "n_views"),
        ({"spec": "not json"}, 422, "spec", ""),
        ({"data": ct_measurement((1, 7, 48))}, 422, "measurement", "expects (1, 8, 48)"),
        ({"data": ct_measurement(value=np.nan)}, 422, "measurement", "NaN"),
        ({"data": b"\x93NUMPY garbage"}, 422, "measurement", ".npy"),
        ({"model": "nope"}, 422, "model", "not found"),
        ({"sampler": "magic"}, 422, "sampler", "one of"),
        (
            {
                "spec": '{"modality": "ct", "image_size": 256, "n_views": 8}',
                "data": ct_measurement((1, 8, 365)),
            },
            422,
            "spec.image_size",
            "set the spec's image_size to 128 or less",
        ),
    ],
)
def test_bad_requests_are_refused_with_the_field_and_a_hint(
    gateway, kwargs, status, field, message
):
    client, keys, app = gateway
    r = submit(client, keys["alice"], **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert body["field"] == field and message in body["detail"]
    assert app.state.jobs.count_by_state()["queued"] == 0  # nothing stored


def test_pickled_npy_and_oversized_uploads_are_refused(gateway, settings):
    client, keys, _ = gateway
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert submit(client, keys["alice"], data=buf.getvalue()).status_code == 422
    settings.max_upload_mb = 0.001
    r = submit(client, keys["alice"], data=ct_measurement((1, 8, 48)))
    assert r.status_code == 413 and r.json()["field"] == "measurement"


def test_idempotency_key(gateway):
    client, keys, _ = gateway
    h = {"Idempotency-Key": "study-42"}
    first = submit(client, keys["alice"], headers=h)
    again = submit(client, keys["alice"], headers=h)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = submit(client, keys["alice"], headers=h, seed="7")
    assert other.status_code == 409 and other.json()["field"] == "Idempotency-Key"
    # Another owner may use the same key for its own job.
    assert submit(client, keys["bob"], headers=h).status_code == 202


def test_listing_is_paginated_filtered_and_private(gateway):
    client, keys, _ = gateway
    ids = [submit(client, keys["alice"]).json()["id"] for _ in range(3)]
    submit(client, keys["bob"])
    for i in ids:
        wait(client, keys["alice"], i)
    page = client.get("/v1/jobs?limit=2", headers=auth(keys["alice"])).json()
    assert page["total"] == 3 and len(page["items"]) == 2 and page["next_offset"] == 2
    rest = client.get("/v1/jobs?limit=2&offset=2", headers=auth(keys["alice"])).json()
    assert len(rest["items"]) == 1 and rest["next_offset"] is None
    seen = {j["id"] for j in page["items"] + rest["items"]}
    assert seen == set(ids)
    done = client.get("/v1/jobs?state=succeeded", headers=auth(keys["alice"])).json()
    assert done["total"] == 3
    bad = client.get("/v1/jobs?state=lost", headers=auth(keys["alice"]))
    assert bad.status_code == 422 and bad.json()["field"] == "state"


def test_cancellation_of_queued_and_running_jobs(gateway):
    client, keys, _ = gateway
    slow = submit(client, keys["alice"], nfe="4000", sampler="fast").json()
    queued = submit(client, keys["alice"]).json()  # one embedded worker: this one waits
    r = client.delete(f"/v1/jobs/{queued['id']}", headers=auth(keys["alice"]))
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    time.sleep(0.5)
    client.delete(f"/v1/jobs/{slow['id']}", headers=auth(keys["alice"]))
    assert wait(client, keys["alice"], slow["id"])["state"] == "cancelled"
    assert wait(client, keys["alice"], queued["id"])["state"] == "cancelled"
    again = client.delete(f"/v1/jobs/{slow['id']}", headers=auth(keys["alice"]))
    assert again.status_code == 409


ENDPOINTS = [
    ("get", "/v1/jobs", "recon:read"),
    ("get", "/v1/models", None),
    ("get", "/v1/models/tiny32", None),
    ("get", "/v1/admin/api-keys", "admin"),
    ("get", "/v1/admin/audit", "admin"),
    ("delete", "/v1/admin/api-keys/000000000000", "admin"),
]


@pytest.mark.parametrize("method,path,needed", ENDPOINTS)
def test_auth_matrix(gateway, method, path, needed):
    client, keys, _ = gateway
    call = getattr(client, method)
    assert call(path).status_code == 401
    assert call(path, headers=auth("sr_bad_key")).status_code == 401
    if needed == "admin":
        assert call(path, headers=auth(keys["alice"])).status_code == 403
    if needed == "recon:read":
        assert call(path, headers=auth(keys["reader"])).status_code == 200
    ok = call(path, headers=auth(keys["admin"]))
    assert ok.status_code in (200, 404), ok.text  # 404: the key id in the path does not exist


def test_submit_needs_the_submit_scope_and_others_jobs_are_404(gateway):
    client, keys, _ = gateway
    assert submit(client, keys["reader"]).status_code == 403
    job = submit(client, keys["alice"]).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(keys["bob"])).status_code == 404
    assert client.delete(f"/v1/jobs/{job['id']}", headers=auth(keys["bob"])).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(keys["admin"])).status_code == 200


def test_admin_key_management_and_audit(gateway):
    client, keys, _ = gateway
    r = client.post(
        "/v1/admin/api-keys",
        json={"scopes": ["recon:read"], "owner": "carol"},
        headers=auth(keys["admin"]),
    )
    assert r.status_code == 201
    new = r.json()
    assert client.get("/v1/jobs", headers=auth(new["key"])).status_code == 200
    listed = client.get("/v1/admin/api-keys", headers=auth(keys["admin"])).text
    assert new["id"] in listed and new["key"] not in listed
    assert (
        client.delete(f"/v1/admin/api-keys/{new['id']}", headers=auth(keys["admin"])).status_code
        == 200
    )
    assert client.get("/v1/jobs", headers=auth(new["key"])).status_code == 401
    bad = client.post("/v1/admin/api-keys", json={"scopes": ["root"]}, headers=auth(keys["admin"]))
    assert bad.status_code == 422
    submit(client, keys["reader"])  # denied: audited
    audit = client.get("/v1/admin/audit", headers=auth(keys["admin"])).json()["items"]
    actions = [a["action"] for a in audit]
    assert {"create-key", "revoke-key", "denied"} <= set(actions)
    assert new["key"] not in str(audit)


def test_health_readiness_metrics_and_models(gateway):
    client, keys, _ = gateway
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    scrape = auth(METRICS_TOKEN)  # the configured scraper's token (closed without it)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth(keys["admin"])).status_code == 401
    assert 'scorerecon_jobs{state="queued"}' in client.get("/metrics", headers=scrape).text
    job = submit(client, keys["alice"]).json()
    wait(client, keys["alice"], job["id"])
    text = client.get("/metrics", headers=scrape).text
    assert "scorerecon_queue_depth 0" in text
    assert 'scorerecon_job_seconds_count{kind="reconstruction",state="succeeded"} 1' in text
    models = client.get("/v1/models", headers=auth(keys["alice"])).json()["items"]
    assert "tiny32" in [m["id"] for m in models]
    card = client.get("/v1/models/tiny32", headers=auth(keys["alice"])).json()
    assert card["image_size"] == 32 and "weights_sha256" in card
    for name in ("tiny32", "mri-default", "ct-default"):  # no folder of any machine
        text = client.get(f"/v1/models/{name}", headers=auth(keys["alice"])).text
        assert '"/' not in text and str(Path.home()) not in text, name
    assert client.get("/v1/models/../etc", headers=auth(keys["alice"])).status_code == 404


def test_a_broken_model_card_is_listed_as_unusable_and_breaks_nothing(gateway, settings):
    """A model folder whose card.json is corrupt (a half-copied export, an editor's leftover)
    used to make GET /v1/models and every submission a 500."""
    client, keys, _ = gateway
    for name, text in (("half-copied", '{"image_size": 3'), ("a-list", "[1, 2]")):
        (settings.models / name).mkdir()
        (settings.models / name / "card.json").write_text(text)
    r = client.get("/v1/models", headers=auth(keys["alice"]))
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["items"]]
    assert "tiny32" in ids and "half-copied" not in ids and "a-list" not in ids
    unusable = {u["id"]: u["error"] for u in r.json()["unusable"]}
    assert set(unusable) == {"half-copied", "a-list"}
    assert "re-export" in unusable["half-copied"] and str(settings.home) not in str(unusable)
    assert client.get("/v1/models/half-copied", headers=auth(keys["alice"])).status_code == 404
    bad = submit(client, keys["alice"], model="half-copied")
    assert bad.status_code == 422 and bad.json()["field"] == "model"
    job = submit(client, keys["alice"]).json()
    assert wait(client, keys["alice"], job["id"])["state"] == "succeeded"


def test_a_stack_of_slices_runs_in_batches_and_keeps_slice_order(gateway):
    client, keys, _ = gateway
    stack = np.stack([np.load(io.BytesIO(ct_measurement()))[0] * s for s in (0.0, 1.0, 2.0)])
    buf = io.BytesIO()
    np.save(buf, stack[:, None])
    r = submit(client, keys["alice"], data=buf.getvalue(), samples="1")
    assert r.status_code == 202, r.text
    done = wait(client, keys["alice"], r.json()["id"])
    assert done["state"] == "succeeded", done.get("error")
    recon = np.load(
        io.BytesIO(client.get(done["links"]["result_npy"], headers=auth(keys["alice"])).content)
    )
    assert recon.shape == (3, 1, 32, 32)
    means = recon.reshape(3, -1).mean(1)
    assert means[0] < means[1] < means[2]  # brighter data, brighter slice: order kept


def test_a_stack_equals_its_slices_sent_one_by_one(gateway):
    """Slice i of a stack submitted with ``seed`` draws the noise of that slice submitted
    alone with ``seed + i``: a volume gives the same images in one job, in batches, or split
    over jobs and workers."""
    client, keys, _ = gateway
    stack = np.stack([np.load(io.BytesIO(ct_measurement()))[0] * s for s in (0.5, 1.0, 1.5)])
    results = []
    for data, seed in [(stack, 7)] + [(stack[i : i + 1], 7 + i) for i in range(3)]:
        buf = io.BytesIO()
        np.save(buf, data[:, None])
        r = submit(client, keys["alice"], data=buf.getvalue(), samples="2", seed=str(seed))
        assert r.status_code == 202, r.text
        done = wait(client, keys["alice"], r.json()["id"])
        assert done["state"] == "succeeded", done.get("error")
        link = done["links"]["result_npy"]
        results.append(np.load(io.BytesIO(client.get(link, headers=auth(keys["alice"])).content)))
    one_by_one = np.concatenate(results[1:])
    assert results[0].shape == one_by_one.shape == (3, 1, 32, 32)
    np.testing.assert_allclose(results[0], one_by_one, atol=1e-3 * float(np.ptp(one_by_one)))


def _stack(n: int) -> bytes:
    one = np.load(io.BytesIO(ct_measurement()))[0]
    buf = io.BytesIO()
    np.save(buf, np.stack([one * (0.5 + 0.1 * i) for i in range(n)])[:, None])
    return buf.getvalue()


def test_a_volume_split_into_slabs_is_one_job_with_the_images_of_the_whole(gateway, settings):
    """With ``slab_slices`` set, a 10-slice volume runs as slab jobs (4, 4 and 2 slices) on
    the embedded workers; the client sees one job, with progress in slices and no parts in
    its listing, and gets the images, std and baseline of the same volume run whole."""
    client, keys, app = gateway
    key, outputs = keys["alice"], []
    for slab_slices in (0, 4):
        settings.slab_slices = slab_slices  # the executor's settings: read as each job runs
        r = submit(client, key, data=_stack(10), samples="2", seed="5")
        assert r.status_code == 202, r.text
        job_id, phases = r.json()["id"], set()
        while (job := client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json())["state"] in (
            "queued",
            "running",
        ):
            phases.add(job["progress"]["phase"])
            time.sleep(0.05)
        assert job["state"] == "succeeded", job["error"]
        assert any(p.startswith("sampling ") and p.endswith("/10 slices") for p in phases), phases
        report = client.get(job["links"]["result_json"], headers=auth(key)).json()
        assert report["slices"] == 10 and len(report["residual"]) == 10
        arrays = [
            np.load(io.BytesIO(client.get(job["links"][f"result_{f}"], headers=auth(key)).content))
            for f in ("npy", "std", "baseline")
        ]
        outputs.append((arrays, report))
    (whole, whole_report), (split, split_report) = outputs
    assert "slabs" not in whole_report and split_report["slabs"] == [[0, 4], [4, 8], [8, 10]]
    for a, b in zip(whole, split, strict=True):
        assert a.shape == b.shape and a.shape[0] == 10
        np.testing.assert_allclose(b, a, atol=1e-4 * float(np.ptp(a)) + 1e-7)
    assert split_report["nfe"] == whole_report["nfe"]
    # The parts are internal: not listed, not readable by id.
    listed = client.get("/v1/jobs?limit=200", headers=auth(keys["admin"])).json()["items"]
    assert {j["kind"] for j in listed} == {"reconstruction"} and len(listed) == 2
    from service.db import slab_id

    part = slab_id(job["id"], 4)
    assert app.state.jobs.get(part).state == "succeeded"
    assert client.get(f"/v1/jobs/{part}", headers=auth(key)).status_code == 404
    assert not app.state.results.exists(part, "slab.npz")  # spent once the volume is whole
    # The metrics count the two jobs the client sent; the three parts apart.
    text = client.get("/metrics", headers=auth(METRICS_TOKEN)).text
    assert 'scorerecon_jobs{state="succeeded"} 2' in text
    assert 'scorerecon_slabs{state="succeeded"} 3' in text
    assert "scorerecon_queue_depth 0" in text


def test_the_per_job_cost_limit_counts_one_slab_of_a_split_volume(gateway, settings):
    """SCORERECON_MAX_JOB_COST bounds one worker's share: a volume too costly whole is
    accepted once it is split into slabs that each fit."""
    client, keys, _ = gateway
    settings.max_job_cost = 6 * 4 * 32 * 32  # 6 NFE × 1 sample × 4 slices of 32²
    whole = submit(client, keys["alice"], data=_stack(10), samples="1")
    assert whole.status_code == 422 and "SCORERECON_MAX_JOB_COST" in whole.json()["detail"]
    settings.slab_slices = 4
    split = submit(client, keys["alice"], data=_stack(10), samples="1")
    assert split.status_code == 202, split.text
    settings.max_job_cost = 6 * 3 * 32 * 32  # a slab of 4 no longer fits: named as such
    refused = submit(client, keys["alice"], data=_stack(10), samples="1")
    assert refused.status_code == 422 and "slices per slab" in refused.json()["detail"]


def test_the_cost_counts_the_pixels_the_network_evaluates_not_the_image(gateway, settings):
    """A 48² slice through a 32² prior is scored patch-wise on up to 3 × 3 tiles of 32²
    (9216 pixels a score evaluation, not 2304); a 16² slice on one padded 32² canvas."""
    client, keys, _ = gateway
    settings.max_job_cost = 6 * 1 * 48 * 48 * 3  # room for 48² thrice, not for its tiles
    big = '{"modality": "ct", "image_size": 48, "n_views": 8}'
    y = ct_measurement(from_spec(json.loads(big)).measurement_shape())
    refused = submit(client, keys["alice"], data=y, spec=big, nfe="6", samples="1")
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert "9,216" in detail and "pixels the network evaluates" in detail
    settings.max_job_cost = 6 * 1 * 9216
    assert submit(client, keys["alice"], data=y, spec=big, nfe="6", samples="1").status_code == 202
    settings.max_job_cost = 6 * 1 * 32 * 32 - 1  # a 16² slice still costs a 32² canvas
    small = '{"modality": "ct", "image_size": 16, "n_views": 8}'
    y = ct_measurement(from_spec(json.loads(small)).measurement_shape())
    refused = submit(client, keys["alice"], data=y, spec=small, nfe="6", samples="1")
    assert refused.status_code == 422 and "1,024" in refused.json()["detail"]


def test_nfe_and_samples_omitted_take_the_cards_defaults(gateway, settings):
    """A request without ``nfe`` or ``samples`` gets the model card's (its warm start
    included): what the benchmarks chose, not a constant of the gateway."""
    from models.registry import update_card

    client, keys, _ = gateway
    ct = {"nfe": 7, "start": 0.5, "samples": 3, "larger": {"samples": 2}}
    update_card(settings.models / "tiny32", {"recon": {"ct": ct}})
    r = client.post(
        "/v1/reconstructions",
        files={"measurement": ("y.npy", ct_measurement())},
        data={"spec": CT_SPEC, "model": "tiny32"},
        headers=auth(keys["alice"]),
    )
    assert r.status_code == 202, r.text
    assert (r.json()["params"]["nfe"], r.json()["params"]["samples"]) == (7, 3)
    done = wait(client, keys["alice"], r.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    report = client.get(done["links"]["result_json"], headers=auth(keys["alice"])).json()
    assert report["nfe"] == 7 and report["provenance"]["config.start"] == 0.5
    spec = '{"modality": "ct", "image_size": 64, "n_views": 8}'  # above the prior's 32²
    larger = submit(client, keys["alice"], data=ct_measurement((1, 8, 93)), spec=spec)
    assert larger.status_code == 202, larger.text
    assert larger.json()["params"]["samples"] == 2  # the card's ``larger`` → samples
    done = wait(client, keys["alice"], larger.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    report = client.get(done["links"]["result_json"], headers=auth(keys["alice"])).json()
    assert report["provenance"]["samples"] == 2


def test_a_ct_image_larger_than_the_prior_is_reconstructed_patch_wise(gateway):
    client, keys, _ = gateway
    spec = '{"modality": "ct", "image_size": 64, "n_views": 8}'
    r = submit(client, keys["alice"], data=ct_measurement((1, 8, 93)), spec=spec, samples="2")
    assert r.status_code == 202, r.text
    done = wait(client, keys["alice"], r.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    npy = client.get(done["links"]["result_npy"], headers=auth(keys["alice"])).content
    assert np.load(io.BytesIO(npy)).shape == (1, 1, 64, 64)


def test_a_second_assembly_that_finds_the_parts_gone_leaves_the_volume_alone(
    gateway, settings, monkeypatch
):
    """Two workers may settle a volume at once. The one that wins deletes the parts' arrays;
    the other, mid-way through reading them, finds them gone and the volume assembled, and
    stops without an error, the volume's results intact."""
    from service.db import slab_id
    from workers.kinds.reconstruct import SLAB_ARRAYS, settle

    client, keys, app = gateway
    jobs, results = app.state.jobs, app.state.results
    settings.slab_slices = 4
    kept: list[str] = []
    monkeypatch.setattr(results, "delete", lambda job, names=None: kept.append(job))  # replay
    job_id = submit(client, keys["alice"], data=_stack(8), samples="1").json()["id"]
    assert wait(client, keys["alice"], job_id)["state"] == "succeeded"
    parts = [slab_id(job_id, s) for s in (0, 4)]
    assert sorted(kept) == sorted(parts)
    monkeypatch.undo()
    jobs.set_fields(job_id, state="running")  # as the loser saw it before the winner ended
    real_get = results.get

    def winner_ends_meanwhile(job: str, name: str) -> bytes:
        data = real_get(job, name)
        if name == "slab.npz" and job == parts[0]:
            jobs.transition(job_id, ["running"], "succeeded")
            for part in parts:
                results.delete(part, names=SLAB_ARRAYS)
        return data

    monkeypatch.setattr(results, "get", winner_ends_meanwhile)
    assert settle(job_id, jobs, results) == "skipped"
    monkeypatch.undo()
    done = client.get(f"/v1/jobs/{job_id}", headers=auth(keys["alice"])).json()
    assert done["state"] == "succeeded"
    npy = client.get(done["links"]["result_npy"], headers=auth(keys["alice"])).content
    assert np.load(io.BytesIO(npy)).shape[0] == 8
    assert not any(results.exists(p, "slab.json") for p in parts)
    assert all(results.exists(p, "report.json") for p in parts)  # the parts' reports stay


def test_a_cancelled_volume_cancels_its_slabs(gateway, settings):
    client, keys, app = gateway
    settings.slab_slices = 4
    r = submit(client, keys["alice"], data=_stack(8), nfe="3000")
    job_id = r.json()["id"]
    end = time.monotonic() + 60
    while (
        client.get(f"/v1/jobs/{job_id}", headers=auth(keys["alice"])).json()["progress"]["step"]
        == 0
    ):
        assert time.monotonic() < end, "the volume never showed progress"
        time.sleep(0.05)
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(keys["alice"])).status_code == 200
    assert wait(client, keys["alice"], job_id, timeout=60)["state"] == "cancelled"
    from service.db import slab_id

    end = time.monotonic() + 60
    while not all(
        app.state.jobs.get(slab_id(job_id, s)).state in ("cancelled", "succeeded") for s in (0, 4)
    ):
        assert time.monotonic() < end, "a slab kept running after its volume was cancelled"
        time.sleep(0.05)


def test_admin_sampling_and_training_jobs(gateway, settings, tmp_path):
    client, keys, _ = gateway
    req = {"model": "tiny32", "n": 3, "sampler": "fast", "steps": 3}
    assert (
        client.post("/v1/admin/sampling", json=req, headers=auth(keys["alice"])).status_code == 403
    )
    r = client.post("/v1/admin/sampling", json=req, headers=auth(keys["admin"]))
    assert r.status_code == 202, r.text
    done = wait(client, keys["admin"], r.json()["id"])
    assert done["state"] == "succeeded" and done["kind"] == "sampling", done
    samples = client.get(done["links"]["result_npy"], headers=auth(keys["admin"]))
    assert np.load(io.BytesIO(samples.content)).shape == (3, 1, 32, 32)
    bad = client.post(
        "/v1/admin/sampling", json={**req, "model": "nope"}, headers=auth(keys["admin"])
    )
    assert bad.status_code == 422 and bad.json()["field"] == "model"
    # Training reads only registered server-side folders.
    data = tmp_path / "archive" / "ct"
    data.mkdir(parents=True)
    for i in range(4):
        np.save(data / f"s{i}.npy", np.random.default_rng(i).random((16, 16)).astype(np.float32))
    train = {
        "data_dir": str(data),
        "model_id": "site-ct",
        "preset": "tiny",
        "image_size": 16,
        "steps": 3,
        "batch_size": 2,
        "checkpoint_every": 3,
        "preview": 1,
        "val_fraction": 0,
    }
    refused = client.post("/v1/admin/training", json=train, headers=auth(keys["admin"]))
    assert refused.status_code == 422 and refused.json()["field"] == "data_dir"
    settings.data_dirs = [tmp_path / "archive"]
    r = client.post("/v1/admin/training", json=train, headers=auth(keys["admin"]))
    assert r.status_code == 202, r.text
    done = wait(client, keys["admin"], r.json()["id"], timeout=120)
    assert done["state"] == "succeeded", done.get("error")
    models = client.get("/v1/models", headers=auth(keys["alice"])).json()["items"]
    assert "site-ct" in [m["id"] for m in models]
    again = client.post("/v1/admin/training", json=train, headers=auth(keys["admin"]))
    assert again.status_code == 409
    report = client.get(done["links"]["result_json"], headers=auth(keys["admin"])).json()
    assert report["model"] == "site-ct" and report["n_images"] == 4


def test_npz_uploads_and_complex_kspace_pairs(gateway):
    client, keys, _ = gateway
    y = np.load(io.BytesIO(ct_measurement()))
    buf = io.BytesIO()
    np.savez_compressed(buf, sino=y)
    assert submit(client, keys["alice"], data=buf.getvalue()).status_code == 202
    two = io.BytesIO()
    np.savez(two, a=y, b=y)
    r = submit(client, keys["alice"], data=two.getvalue())
    assert r.status_code == 422 and "one array" in r.json()["detail"]
    bomb = io.BytesIO()
    np.savez_compressed(bomb, x=np.zeros((8000, 8000), np.float32))  # 256 MB of zeros
    r = submit(client, keys["alice"], data=bomb.getvalue())
    assert r.status_code == 413 and "inflates" in r.json()["detail"]


def test_rate_limit_and_admission_control(settings):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_key

    settings.rate_limit_per_minute = 3
    settings.max_queue = 1
    settings.embedded_workers = 1
    app = create_app(settings)
    key = create_key(app.state.jobs, ["recon:submit", "recon:read"], "alice")[1]
    with TestClient(app) as client:
        statuses = [client.get("/v1/jobs", headers=auth(key)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        r = client.get("/v1/jobs", headers=auth(key))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    app.state.jobs.engine.dispose()
    settings.rate_limit_per_minute = 1000
    app = create_app(settings)
    key = create_key(app.state.jobs, ["recon:submit", "recon:read"], "bob")[1]
    with TestClient(app) as client:
        first = submit(client, key, sampler="fast", nfe="4000")  # occupies the worker
        end = time.monotonic() + 60
        while client.get(first.headers["Location"], headers=auth(key)).json()["state"] == (
            "queued"
        ):
            assert time.monotonic() < end, "the worker never took the first job"
            time.sleep(0.05)
        second = submit(client, key)  # waits in the queue
        third = submit(client, key)
        assert first.status_code == 202 and second.status_code == 202, second.text
        assert third.status_code == 429 and "queued" in third.json()["detail"]
        for r in (first, second):
            client.delete(f"/v1/jobs/{r.json()['id']}", headers=auth(key))
    app.state.jobs.engine.dispose()


def test_kspace_as_fastmri_hdf5_is_accepted_and_garbage_hdf5_refused(gateway):
    import h5py
    import torch

    client, keys, _ = gateway
    spec = (
        '{"modality": "mri", "image_size": 32, "mask": {"kind": "equispaced", "acceleration": 4}}'
    )
    op = from_spec(spec)
    full = op.pad(op.forward(torch.rand(1, 1, 32, 32))).numpy()[:, 0]
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("kspace", data=full)
    r = submit(client, keys["alice"], data=buf.getvalue(), spec=spec)
    assert r.status_code == 202, r.text
    assert wait(client, keys["alice"], r.json()["id"])["state"] == "succeeded"
    r = submit(client, keys["alice"], data=b"\x89HDF\r\n\x1a\nbroken", spec=spec)
    assert r.status_code == 422 and "HDF5" in r.json()["detail"]


def test_source_from_an_uploaded_dicom_and_export_destination_checked(gateway):
    from pydicom.data import get_testdata_file

    client, keys, _ = gateway
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()
    files = {
        "measurement": ("y.npy", ct_measurement()),
        "source_dicom": ("source.dcm", ct),
    }
    fields = {"spec": CT_SPEC, "model": "tiny32", "nfe": "4", "sampler": "fast"}
    r = client.post("/v1/reconstructions", files=files, data=fields, headers=auth(keys["alice"]))
    assert r.status_code == 202, r.text
    done = wait(client, keys["alice"], r.json()["id"])
    dicom = client.get(done["links"]["result_dicom"], headers=auth(keys["alice"]))
    with zipfile.ZipFile(io.BytesIO(dicom.content)) as z:
        first = pydicom.dcmread(io.BytesIO(z.read(z.namelist()[0])))
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert first.StudyInstanceUID == source.StudyInstanceUID
    assert first.PatientID == source.PatientID
    files["source_dicom"] = ("source.dcm", b"garbage")
    r = client.post("/v1/reconstructions", files=files, data=fields, headers=auth(keys["alice"]))
    assert r.status_code == 422 and r.json()["field"] == "source_dicom"
    files["source_dicom"] = ("source.dcm", ct)
    r = client.post(
        "/v1/reconstructions",
        files=files,
        data={**fields, "export_to": "nowhere"},
        headers=auth(keys["alice"]),
    )
    assert r.status_code == 422 and r.json()["field"] == "export_to"


def test_a_source_instance_that_does_not_fit_the_measurement_is_refused(gateway):
    """The source instance lends the series its study and its slice's geometry: one of
    another modality, one without geometry, and one for a stack of slices are refused."""
    from pydicom.data import get_testdata_file

    client, keys, _ = gateway
    fields = {"spec": CT_SPEC, "model": "tiny32", "nfe": "4", "sampler": "fast"}

    def refused(ds: pydicom.Dataset, measurement: bytes, words: str) -> None:
        buf = io.BytesIO()
        ds.save_as(buf)
        files = {"measurement": ("y.npy", measurement), "source_dicom": ("s.dcm", buf.getvalue())}
        r = client.post(
            "/v1/reconstructions", files=files, data=fields, headers=auth(keys["alice"])
        )
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "source_dicom" and words in r.json()["detail"], r.json()

    before = client.get("/v1/jobs", headers=auth(keys["alice"])).json()
    mr = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mr.Modality = "MR"
    refused(mr, ct_measurement(), "the source instance is MR but the measurement is CT")
    flat = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del flat.ImagePositionPatient, flat.ImageOrientationPatient, flat.PixelSpacing
    refused(flat, ct_measurement(), "no image geometry")
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    refused(ct, ct_measurement((3, 1, 8, 48)), "1 source instance(s) for 3 measured slice(s)")
    bent = {"PatientID": "P-1", "StudyInstanceUID": "1.2.3", "ImagePositionPatient": "1\\2"}
    files = {"measurement": ("y.npy", ct_measurement())}
    r = client.post(
        "/v1/reconstructions",
        files=files,
        data={**fields, "source": json.dumps(bent)},
        headers=auth(keys["alice"]),
    )
    assert r.status_code == 422 and r.json()["field"] == "source", r.text
    assert client.get("/v1/jobs", headers=auth(keys["alice"])).json() == before


def test_each_slice_of_a_stack_takes_its_source_slices_geometry(gateway):
    """Three source instances sent in shuffled order with a three-slice measurement: the
    reconstructed slice k lies where the k-th source slice along the normal lies, and
    references it."""
    from pydicom.data import get_testdata_file

    client, keys, _ = gateway
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    instances = {}
    for z in (20.0, 0.0, 10.0):
        ds = base.copy()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7.{int(z)}"
        ds.ImagePositionPatient = [-158.1, -179.0, z]
        buf = io.BytesIO()
        ds.save_as(buf)
        instances[z] = buf.getvalue()
    files = [("measurement", ("y.npy", ct_measurement((3, 1, 8, 48))))] + [
        ("source_dicom", (f"{z}.dcm", raw)) for z, raw in instances.items()
    ]
    fields = {"spec": CT_SPEC, "model": "tiny32", "nfe": "4", "sampler": "fast"}
    r = client.post("/v1/reconstructions", files=files, data=fields, headers=auth(keys["alice"]))
    assert r.status_code == 202, r.text
    done = wait(client, keys["alice"], r.json()["id"])
    dicom = client.get(done["links"]["result_dicom"], headers=auth(keys["alice"]))
    with zipfile.ZipFile(io.BytesIO(dicom.content)) as z:
        names = sorted(n for n in z.namelist() if n.startswith("101/"))
        recon = [pydicom.dcmread(io.BytesIO(z.read(n))) for n in names]
    assert [float(ds.ImagePositionPatient[2]) for ds in recon] == [0.0, 10.0, 20.0]
    assert [ds.SourceImageSequence[0].ReferencedSOPInstanceUID[-2:] for ds in recon] == [
        ".0",
        "10",
        "20",
    ]
    assert {ds.FrameOfReferenceUID for ds in recon} == {base.FrameOfReferenceUID}
    two = files[:3]  # two instances for three slices
    r = client.post("/v1/reconstructions", files=two, data=fields, headers=auth(keys["alice"]))
    assert r.status_code == 422 and "2 source instance(s) for 3" in r.json()["detail"]


def test_training_on_an_uploaded_archive(gateway):
    client, keys, _ = gateway
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(4):
            arr = io.BytesIO()
            np.save(arr, np.random.default_rng(i).random((16, 16)).astype(np.float32))
            z.writestr(f"ct/s{i}.npy", arr.getvalue())
        z.writestr("ct/notes.npy", b"not an array")
    archive = {"archive": ("ct.zip", buf.getvalue())}
    refused = client.post("/v1/admin/datasets", files=archive, headers=auth(keys["alice"]))
    assert refused.status_code == 403
    r = client.post("/v1/admin/datasets", files=archive, headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["files"] == 5 and len(dataset["volumes"]) == 4
    assert len(dataset["skipped"]) == 1 and dataset["skipped"][0].startswith("ct/notes.npy")
    # The archive's own paths, not the server's folders.
    assert sorted(v.split()[-1] for v in dataset["volumes"]) == [f"ct/s{i}.npy" for i in range(4)]
    bad = client.post(
        "/v1/admin/datasets",
        files={"archive": ("x.zip", b"PK garbage")},
        headers=auth(keys["admin"]),
    )
    assert bad.status_code == 422 and bad.json()["field"] == "archive"
    train = {
        "dataset": dataset["id"],
        "model_id": "uploaded-ct",
        "preset": "tiny",
        "image_size": 16,
        "steps": 2,
        "batch_size": 2,
        "checkpoint_every": 2,
        "preview": 1,
        "val_fraction": 0,
    }
    both = client.post(
        "/v1/admin/training", json={**train, "data_dir": "/tmp"}, headers=auth(keys["admin"])
    )
    assert both.status_code == 422 and "exactly one data source" in both.json()["detail"]
    unknown = client.post(
        "/v1/admin/training", json={**train, "dataset": "f" * 32}, headers=auth(keys["admin"])
    )
    assert unknown.status_code == 422 and unknown.json()["field"] == "dataset"
    r = client.post("/v1/admin/training", json=train, headers=auth(keys["admin"]))
    assert r.status_code == 202, r.text
    done = wait(client, keys["admin"], r.json()["id"], timeout=120)
    assert done["state"] == "succeeded", done.get("error")
    card = client.get("/v1/models/uploaded-ct", headers=auth(keys["alice"])).json()
    assert card["training_data"]["source"] == {"dataset": dataset["id"]}
    assert card["loss_curve_png"] == "uploaded-ct_loss.png"  # the site's folders not shown


def test_solver_settings_that_cannot_hold_are_refused_naming_the_field(gateway, settings):
    """Issue 18: a mask that cannot reach its stated acceleration, a noise level that is
    negative or not finite, k-space whose calibration lines are all zero, and a model of the
    other modality are each a 422 naming the field; nothing is stored."""
    client, keys, _ = gateway
    mri = {"modality": "mri", "image_size": 32}
    k = np.zeros((1, 32, 8), np.complex64)
    k[..., :] = 1.0 + 1.0j
    mri_spec = {**mri, "mask": {"kind": "equispaced", "acceleration": 4, "center_fraction": 0.08}}
    zero_centre = k.copy()
    mask = from_spec(mri_spec).mask
    measured = mask.any(dim=0).nonzero().flatten().tolist()
    zero_centre[..., [measured.index(int(c)) for c in calibration_lines(mask)]] = 0
    cases = [
        ("spec", {**mri, "mask": {"kind": "equispaced", "acceleration": 24}}, k, "center_fraction"),
        (
            "spec",
            {"modality": "ct", "image_size": 32, "n_views": 8, "noise_std": -1},
            None,
            "noise_std",
        ),
        (
            "spec",
            '{"modality": "ct", "image_size": 32, "n_views": 8, "noise_std": Infinity}',
            None,
            "noise_std",
        ),
        ("measurement", mri_spec, zero_centre, "calibration lines"),
        ("model", mri_spec, k, "CT prior"),
    ]
    before = client.get("/v1/jobs", headers=auth(keys["alice"])).json()
    for field, spec, data, words in cases:
        raw = None
        if data is not None:
            buf = io.BytesIO()
            np.save(buf, data)
            raw = buf.getvalue()
        text = spec if isinstance(spec, str) else json.dumps(spec)
        model = "ct-default" if field == "model" else "tiny32"
        r = submit(client, keys["alice"], raw, spec=text, model=model)
        assert r.status_code == 422, (words, r.text)
        assert r.json()["field"] == field and words in r.json()["detail"], r.text
    assert client.get("/v1/jobs", headers=auth(keys["alice"])).json() == before


def test_multicoil_fastmri_layout_runs_through_gateway_and_worker(gateway, settings, tmp_path):
    """fastMRI's knee layout: 15 coils, readout 640 (2× oversampled) by 368 lines, a mask
    dataset and a header, k-space in a scanner's arbitrary units (fastMRI's are ~1e-5), with
    coil maps estimated from the data (ESPIRiT); bad variants of it are refused with the
    field named."""
    import h5py
    import torch.nn.functional as F

    from models.multicoil import simulate_multicoil, write_fastmri
    from models.phantoms import mri_phantoms

    client, keys, _ = gateway
    image = F.interpolate(mri_phantoms(1, 64, seed=1), size=(640, 736), mode="bilinear")
    case = simulate_multicoil(image, coils=15, acceleration=4, center_fraction=0.08, segments=16)
    units = 3e-5  # the image's 1 in the scanner's units
    case.kspace, case.noise_scan = case.kspace * units, case.noise_scan * units
    path = write_fastmri(tmp_path / "knee.h5", case, recon_columns=320)  # fastMRI's header
    spec = {
        "modality": "mri",
        "image_size": [320, 368],
        "sensitivities": "espirit",
        "mask": {"kind": "equispaced", "acceleration": 4, "center_fraction": 0.08},
    }
    # A prior whose card chooses the multi-coil TV weight by k-space hold-out, as mri-default's.
    holdout = {"mri": {"multicoil": {"tv": 1.0, "tv_holdout": [1.0, 4.0]}}}
    tiny_model(settings.models, "tiny32-tv", holdout)
    r = submit(
        client,
        keys["alice"],
        data=path.read_bytes(),
        spec=json.dumps(spec),
        nfe="4",
        model="tiny32-tv",
    )
    assert r.status_code == 202, r.text
    done = wait(client, keys["alice"], r.json()["id"], timeout=600)
    assert done["state"] == "succeeded", done.get("error")
    # Solved on all 368 encoded lines, shown as the header's reconSpace: 320 × 320.
    npy = client.get(done["links"]["result_npy"], headers=auth(keys["alice"]))
    recon = np.load(io.BytesIO(npy.content))
    assert recon.shape == (1, 1, 320, 320)
    # In the scanner's units: solved in the prior's, whose unit the report gives.
    assert 0.5 < np.percentile(recon, 99) / units < 1.5
    for fmt in ("std", "baseline"):
        got = client.get(done["links"][f"result_{fmt}"], headers=auth(keys["alice"]))
        assert np.load(io.BytesIO(got.content)).shape == (1, 1, 320, 320)
    phase = client.get(done["links"]["result_phase"], headers=auth(keys["alice"]))
    phase = np.load(io.BytesIO(phase.content))
    assert phase.shape == (1, 1, 320, 320) and np.abs(phase).max() <= np.pi + 1e-5
    report = client.get(done["links"]["result_json"], headers=auth(keys["alice"])).json()
    assert report["reconstructed_columns"] == 368
    assert report["provenance"]["tv_chosen_by"] == "k-space hold-out"  # the card's values
    assert report["provenance"]["tv_used"] in ([1.0], [4.0])
    assert 0.5 < report["provenance"]["intensity_scale"][0] / units < 2
    dicom = client.get(done["links"]["result_dicom"], headers=auth(keys["alice"]))
    with zipfile.ZipFile(io.BytesIO(dicom.content)) as z:
        first = pydicom.dcmread(io.BytesIO(z.read(z.namelist()[0])))
    assert (first.Rows, first.Columns) == (320, 320)
    slope = float(first.RealWorldValueMappingSequence[0].RealWorldValueSlope)
    assert np.abs(first.pixel_array * slope - recon[0, 0]).max() < 1e-3 * recon.max()

    def refused(data: bytes, spec: dict, text: str) -> None:
        r = submit(client, keys["alice"], data=data, spec=json.dumps(spec), nfe="4")
        assert r.status_code == 422, r.text
        assert text in r.json()["detail"], r.json()

    raw = path.read_bytes()
    refused(raw, {**spec, "coils": 8}, "coils: the spec says 8 but the measurement has 15")
    eight = {**spec, "mask": {"kind": "equispaced", "acceleration": 8, "center_fraction": 0.04}}
    refused(raw, eight, "mask: the file's mask dataset measures lines")
    with h5py.File(path, "r+") as f:
        k = f["kspace"][()]
        k[0, 3, 10, 184] = np.nan
        f["kspace"][...] = k
    refused(path.read_bytes(), spec, "NaN")
    no_acs = {**spec, "mask": {"kind": "explicit", "lines": list(range(0, 368, 4))}}
    refused(raw, no_acs, "centre lines (at least 8 needed)")


def test_ismrmrd_raw_data_with_a_noise_scan_is_whitened_by_it(gateway, tmp_path):
    """ISMRMRD raw data as a scanner's converter writes it (noise measurements, then the image
    lines with the readout oversampled): the worker whitens the coils with the noise scan and
    says so; a spec at another size than the header's reconSpace is refused."""
    from models.multicoil import simulate_multicoil, write_ismrmrd
    from models.phantoms import mri_phantoms

    client, keys, _ = gateway
    image = mri_phantoms(1, 64, seed=2)
    case = simulate_multicoil(image, coils=4, acceleration=2, center_fraction=0.3, segments=8)
    raw = write_ismrmrd(tmp_path / "raw.h5", case).read_bytes()
    lines = case.mask.nonzero().flatten().tolist()
    spec = {
        "modality": "mri",
        "image_size": 32,
        "sensitivities": "espirit",
        "mask": {"kind": "explicit", "lines": lines},
    }
    r = submit(client, keys["alice"], data=raw, spec=json.dumps(spec), nfe="4")
    assert r.status_code == 202, r.text
    done = wait(client, keys["alice"], r.json()["id"], timeout=300)
    assert done["state"] == "succeeded", done.get("error")
    report = client.get(done["links"]["result_json"], headers=auth(keys["alice"])).json()
    assert report["coil_noise_source"] == "noise scan (256 samples per coil)", report
    r = submit(client, keys["alice"], data=raw, spec=json.dumps({**spec, "image_size": [64, 32]}))
    assert r.status_code == 422, r.text
    assert "image_size: the file's ISMRMRD header reconstructs 32" in r.json()["detail"]
