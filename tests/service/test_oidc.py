"""OIDC bearer tokens against a local key set: valid, expired, wrong audience or issuer,
forged signature, unknown key id; scopes from the token; API keys still work."""

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from tests.service.conftest import signing_key

ISS, AUD = "https://idp.hospital.example", "scorerecon"


@pytest.fixture
def idp(tmp_path):
    jwks = tmp_path / "jwks.json"
    key = signing_key(jwks)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def token(signer=key, kid="k1", **claims):
        body = {
            "iss": ISS,
            "aud": AUD,
            "sub": "dr.house",
            "exp": int(time.time()) + 300,
            "scope": "recon:read openid",
            **claims,
        }
        return jwt.encode(body, signer, algorithm="RS256", headers={"kid": kid})

    return jwks, token, other


def test_tokens_are_verified_and_scoped(settings, idp):
    jwks, token, other = idp
    settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks = ISS, AUD, str(jwks)
    app = create_app(settings)
    api_key = create_key(app.state.jobs, ["recon:read"], "ward")[1]
    with TestClient(app) as client:

        def get(credential):
            return client.get("/v1/jobs", headers={"Authorization": f"Bearer {credential}"})

        assert get(token()).status_code == 200
        assert get(api_key).status_code == 200
        assert get(token(exp=int(time.time()) - 10)).status_code == 401
        assert get(token(aud="other-app")).status_code == 401
        assert get(token(iss="https://evil.example")).status_code == 401
        assert get(token(signer=other)).status_code == 401
        assert get(token(kid="k9")).status_code == 401
        assert get("not.a.jwt").status_code == 401
        # Scopes come from the token: reading is allowed, submitting is not.
        r = client.post(
            "/v1/reconstructions",
            headers={"Authorization": f"Bearer {token()}"},
            files={"measurement": ("y.npy", b"x")},
            data={"spec": "{}"},
        )
        assert r.status_code == 403
    app.state.jobs.engine.dispose()


def test_a_rotated_key_works_at_once_and_unknown_ids_refetch_at_most_once(tmp_path, idp):
    """The provider adds a key: a token signed with it is accepted on first use (one
    refetch, although the cached set is not yet stale); made-up key ids do not refetch again within
    refetch_s."""
    from service.oidc import OIDCVerifier

    jwks, token, _ = idp
    verifier = OIDCVerifier(ISS, AUD, str(jwks), cache_s=300, refetch_s=30)
    assert verifier.verify(token()) is not None and verifier.fetches == 1
    old = jwks.read_text()
    new_key = signing_key(tmp_path / "k2.json", kid="k2")
    keys = json.loads(old)["keys"] + json.loads((tmp_path / "k2.json").read_text())["keys"]
    jwks.write_text(json.dumps({"keys": keys}))
    rotated = token(signer=new_key, kid="k2")
    verifier._loaded -= 31  # the rotation comes a while after the last read, within cache_s
    assert verifier.verify(rotated).owner == "dr.house" and verifier.fetches == 2
    for kid in ("k7", "k8", "k9"):  # an attacker's ids: no more reads for refetch_s
        assert verifier.verify(token(kid=kid)) is None
    assert verifier.fetches == 2
    verifier._loaded -= 31  # refetch_s later, one more read for an unknown id
    assert verifier.verify(token(kid="k9")) is None and verifier.fetches == 3
    assert verifier.verify(token()) is not None and verifier.fetches == 3
