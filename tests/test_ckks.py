"""CKKS aggregation: precision of the decrypted sum, no secret key on the server, ring mode."""

from __future__ import annotations

import numpy as np
import pytest

from jaxfl.secure.ckks import (
    CKKSKeyHolder,
    CKKSParams,
    EncryptedSum,
    ckks_ring_sum,
    ckks_sum,
    ring_mask,
    validate_params,
)

# Measured max abs error of a decrypted sum of 4-10 vectors with |x| < 10 at the default
# scale 2^40: ~3e-9. The tolerance leaves a 300x margin.
TOL = 1e-6
K, D = 4, 10_000  # 3 ciphertexts of 4096 slots, the last one partly filled
PADDED_BYTES = 4 * 3 * 4096


@pytest.fixture(scope="module")
def key_holder() -> CKKSKeyHolder:
    return CKKSKeyHolder()


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 3.0, (K, D))


def test_decrypted_sum_matches_the_plaintext_sum(key_holder, vectors):
    total, stats = ckks_sum(vectors, key_holder)
    assert total.shape == (D,)
    assert np.abs(total - vectors.sum(0)).max() < TOL
    # Seeded symmetric ciphertexts: ~4x the float32 slots they fill; the sum is a full one (~8x).
    assert 3.9 < stats["bytes_per_client"] / PADDED_BYTES < 4.3
    assert stats["result_bytes"] > 1.9 * stats["bytes_per_client"]
    assert stats["context_bytes"] < 1000  # parameters only: no keys at all


def test_another_key_cannot_decrypt(key_holder, vectors):
    blobs = key_holder.encrypt(vectors[0])
    np.testing.assert_allclose(key_holder.decrypt(blobs, D), vectors[0], atol=TOL)
    assert np.abs(CKKSKeyHolder().decrypt(blobs, D) - vectors[0]).max() > 1.0


def test_server_context_holds_no_secret_key(key_holder, vectors):
    server = EncryptedSum(key_holder.public_context())
    assert not server.context.has_secret_key()
    with pytest.raises(ValueError, match="doesn't hold a Secret key"):
        server.context.secret_key()
    server.add(key_holder.encrypt(vectors[0]))
    server.add(key_holder.encrypt(vectors[1]))
    np.testing.assert_allclose(
        key_holder.decrypt(server.serialize(), D), vectors[0] + vectors[1], atol=TOL
    )
    with pytest.raises(ValueError, match="holding the secret key"):
        EncryptedSum(key_holder.context.serialize(save_secret_key=True))


def test_public_key_encryption_also_sums(vectors):
    holder = CKKSKeyHolder(CKKSParams(symmetric=False))
    total, stats = ckks_sum(vectors, holder)
    assert np.abs(total - vectors.sum(0)).max() < TOL
    assert 7.8 < stats["bytes_per_client"] / PADDED_BYTES < 8.5


def test_ring_sum_matches_the_plaintext_sum(key_holder, vectors):
    for round_idx in (0, 5):  # initiators 0 and 1
        total, stats = ckks_ring_sum(vectors, key_holder, round_idx=round_idx)
        assert np.abs(total - vectors.sum(0)).max() < TOL
        assert stats["server_s"] == 0.0
    # The mask really is large: without removing it the result would be off by ~sigma.
    assert np.abs(ring_mask(D, 1e4)).max() > 1e4


def test_the_next_client_cannot_recompute_the_initiators_ring_mask(key_holder, vectors):
    """Regression (issue 12.3): R came from (seed, round), so client 1 removed it exactly."""
    seen = []
    encrypt = key_holder.encrypt

    def spy(values):  # the plaintexts clients encrypt; the initiator's is x_0 + R
        seen.append(np.array(values))
        return encrypt(values)

    key_holder.encrypt = spy
    try:
        for _ in range(2):
            ckks_ring_sum(vectors, key_holder, round_idx=0)
    finally:
        key_holder.encrypt = encrypt
    first, second = seen[0], seen[len(seen) // 2]  # the initiator's message in each call
    mask = first - vectors[0]
    # Same inputs, same round: a fresh mask each time, and no seed reproduces it.
    assert np.abs(second - first).max() > 1e3
    for seed in range(3):
        guess = np.random.default_rng([seed, 0, 0x5249]).normal(0.0, 1e4, D)
        assert np.abs((first - guess) - vectors[0]).max() > 1e3
    assert 0.9e4 < mask.std() < 1.1e4 and abs(mask.mean()) < 1e3


def test_values_that_could_overflow_the_sum_are_refused(key_holder):
    big = np.full((4, 4096), 2e5)  # one full ciphertext: constant slots, largest coefficients
    with pytest.raises(ValueError, match=r"client 0's values reach 2e\+05 .*with 4 clients"):
        ckks_sum(big, key_holder)
    # Why: each vector alone encrypts fine, but their encrypted sum wraps and decrypts to junk.
    server = EncryptedSum(key_holder.public_context())
    for row in big:
        server.add(key_holder.encrypt(row))
    assert np.abs(key_holder.decrypt(server.serialize(), 4096) - 8e5).max() > 1e3


def test_ring_mask_too_large_for_the_parameters_raises(key_holder, vectors):
    with pytest.raises(ValueError, match="ring mask"):
        ckks_ring_sum(vectors, key_holder, round_idx=0, sigma=1e6)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (CKKSParams(poly_modulus_degree=8000), "poly_modulus_degree must be one of"),
        (CKKSParams(coeff_mod_bit_sizes=(60,)), "at least two primes"),
        (CKKSParams(coeff_mod_bit_sizes=(61, 60)), "at least two primes of 20..60 bits"),
        (CKKSParams(poly_modulus_degree=4096), "above the 109 allowed"),
        (CKKSParams(global_scale_bits=59), r"global_scale_bits=59 must be in \[1, 58\]"),
    ],
)
def test_bad_params_raise_clear_errors(params, match):
    with pytest.raises(ValueError, match=match):
        validate_params(params)
    with pytest.raises(ValueError, match=match):
        CKKSKeyHolder(params)


def test_mismatched_ciphertext_counts_raise(key_holder, vectors):
    blobs = key_holder.encrypt(vectors[0])
    with pytest.raises(ValueError, match="cannot hold a vector"):
        key_holder.decrypt(blobs, 2 * D)
    server = EncryptedSum(key_holder.public_context())
    server.add(blobs)
    with pytest.raises(ValueError, match="differ in length"):
        server.add(blobs[:1])
