"""CKKS homomorphic-encryption aggregation with TenSEAL (the only module that imports tenseal).

Two protocols over ``[K, D]`` client vectors:

- ``ckks_sum`` (aggregator ``"ckks"``): every client encrypts its vector, the server adds the
  ciphertexts with a context that holds no secret key (``serialize(save_secret_key=False)``
  read back with ``ts.context_from``) and returns the encrypted sum, which a key holder
  decrypts. The server streams: it keeps one running encrypted sum and drops each client's
  ciphertexts once added, so its memory does not grow with the number of clients.
- ``ckks_ring_sum`` (aggregator ``"ckks_ring"``, PPPML-HMI cyclic aggregation): a rotating
  initiator encrypts its vector plus a Gaussian mask ``R``; the ciphertext travels round the
  ring of clients, each adding its own encrypted vector; back at the initiator ``R`` is
  subtracted as a plaintext and the initiator, a key holder, decrypts.

Trust model: as in PPPML-HMI all clients share one secret key, so CKKS protects the updates from
the server (honest-but-curious, colluding with no client) only: any client that obtained
another's ciphertext could decrypt it. In ring mode each client receives, and can decrypt, the
partial sum of the clients before it plus the initiator's mask ``R``: the initiator's update is
hidden from the next client only by ``R`` (Gaussian, std ``sigma``: statistical hiding, not
encryption), two clients that are the neighbours of a third recover its exact update from the
difference of what they saw, and with 2 clients each learns the other's update from the sum.
``ckks`` (the server sums ciphertexts, clients see nothing of each other) is the recommended
aggregator; README's secure-aggregation section has the table.

Determinism: keys and encryption noise come from SEAL's CSPRNG, so decrypted sums differ run
to run at the level of the CKKS error (~1e-9 by default); the ring mask is drawn by the
initiator from the OS CSPRNG (``jaxfl.secure.entropy``) and cancels up to float rounding.

Encoding: the vector is packed densely, ``N / 2`` values per ciphertext (the last chunk padded
with zeros). Choices for this add-only circuit, measured with TenSEAL 0.3.18 on 2 shared CPU
cores (K = 10 clients, 1M parameters each; seconds per client per 1M parameters, bytes per
client / float32 bytes, max abs error of the decrypted sum):

    coeff bits          scale  encryption   encrypt  server add  decrypt  bytes  error
    60,40,40,60         2^40   public key    1.27 s     0.18 s    0.39 s   20x   4e-8
    60,40,40,60         2^40   seeded        0.68 s     0.27 s    0.39 s   10x   3e-9
    60,60               2^40   public key    0.62 s     0.04 s    0.13 s    8x   4e-8
    60,60 (default)     2^40   seeded        0.30 s     0.09 s    0.13 s    4x   3e-9
    31,26x6,31 (PPPML)  2^26   public key    2.91 s     0.49 s    1.01 s   29x   6e-4

- No multiplication means no rescaling, so one 60-bit data prime is enough. TenSEAL insists on
  a second, "special" prime for key switching, which never appears in a ciphertext; so
  ``(60, 60)`` gives ciphertexts of 2 x N 64-bit words, 8x the float32 plaintext. SEAL's
  zstd compression (on by default) barely shrinks uniformly random words, and the ring degree
  (4096..16384 at these primes) changed nothing measurable; nor did TenSEAL's ``n_threads``
  for its batched ``ckks_tensor`` encryption (0.73 s vs 0.76 s with one thread).
- Clients hold the secret key, so they use SEAL's symmetric encryption, whose serialized
  ciphertexts carry the PRNG seed of their uniform half instead of the half itself: 4x the
  plaintext, and no public-key product to compute. The server expands the seeds when it loads
  them (its add doubles) and the sum it returns is a full ciphertext (8x). TenSEAL's tensor API
  expands the seed before serializing, so ciphertexts go through ``tenseal.sealapi`` (SEAL's
  own bindings) directly.
- Scale 2^40 under a 60-bit prime leaves room for sums up to ``CKKSParams.max_abs_value``
  (2^18); every client checks its share of that budget before encrypting, because an
  overflowing CKKS sum decrypts to garbage without any error. The error is absolute, set by
  the scale, not by the magnitude of the values: ring mode's mask R (sigma 1e4) uses headroom
  but costs no measurable precision (the same 3e-9; at scale 2^30 both modes give 3e-6).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tenseal as ts
from tenseal import sealapi

from jaxfl.secure.entropy import os_normal

# Largest total coefficient-modulus bits SEAL accepts for 128-bit security, by ring degree.
MAX_COEFF_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


class CKKSParams(NamedTuple):
    """CKKS encryption parameters.

    poly_modulus_degree: ring degree ``N`` (a power of two in ``MAX_COEFF_BITS``); a
        ciphertext holds ``N / 2`` values.
    coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes (at most 60 each); the
        last is SEAL's special prime used only for key switching, the others form the
        ciphertext modulus. At least two, total within ``MAX_COEFF_BITS[N]``.
    global_scale_bits: values are encoded as ``round(value * 2^global_scale_bits)``; the
        decryption error of a sum of 10 fresh ciphertexts is about
        ``2^(12 - global_scale_bits)`` (3e-9 at 2^40, 3e-6 at 2^30).
    symmetric: encrypt with the secret key (seeded ciphertexts, half the size) rather than the
        public key.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    global_scale_bits: int = 40
    symmetric: bool = True

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def max_abs_value(self) -> float:
        """Largest magnitude an encrypted value (a sum included) may reach: half the ciphertext
        modulus over the scale, with a further factor of 2 margin."""
        data_bits = sum(self.coeff_mod_bit_sizes[:-1])
        return 2.0 ** (data_bits - self.global_scale_bits - 2)


def validate_params(params: CKKSParams) -> None:
    """Raise ``ValueError`` naming the problem with ``params`` and the fix."""
    N, bits = params.poly_modulus_degree, tuple(params.coeff_mod_bit_sizes)
    if N not in MAX_COEFF_BITS:
        raise ValueError(
            f"CKKSParams.poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS)}, got {N}"
        )
    if len(bits) < 2 or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits):
        raise ValueError(
            "CKKSParams.coeff_mod_bit_sizes needs at least two primes of 20..60 bits (the last "
            f"one is the key-switching prime; an add-only circuit needs (60, 60)), got {bits}"
        )
    if sum(bits) > MAX_COEFF_BITS[N]:
        raise ValueError(
            f"CKKSParams.coeff_mod_bit_sizes {bits} total {sum(bits)} bits, above the "
            f"{MAX_COEFF_BITS[N]} allowed at 128-bit security for poly_modulus_degree {N}; use "
            "fewer or smaller primes or a larger degree"
        )
    if not 1 <= params.global_scale_bits <= sum(bits[:-1]) - 2:
        raise ValueError(
            f"CKKSParams.global_scale_bits={params.global_scale_bits} must be in "
            f"[1, {sum(bits[:-1]) - 2}] to leave headroom under the {sum(bits[:-1])}-bit "
            "ciphertext modulus"
        )


class _Wire:
    """Bytes <-> SEAL ciphertexts. The sealapi bindings save and load only through file paths,
    so objects pass through one file in a private temporary directory (tmpfs when present);
    only ciphertexts, never keys, are written."""

    def __init__(self, seal_context) -> None:
        self._context = seal_context
        self._dir = tempfile.TemporaryDirectory(
            prefix="jaxfl-ckks-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        self._path = os.path.join(self._dir.name, "ciphertext")

    def dump(self, ciphertext) -> bytes:
        ciphertext.save(self._path)
        with open(self._path, "rb") as f:
            return f.read()

    def load(self, data: bytes) -> sealapi.Ciphertext:
        with open(self._path, "wb") as f:
            f.write(data)
        ciphertext = sealapi.Ciphertext()
        ciphertext.load(self._context, self._path)
        return ciphertext


def _as_vector(x: np.ndarray) -> np.ndarray:
    v = np.asarray(x, np.float64)
    if v.ndim != 1:
        raise ValueError(f"expected a [D] vector, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("the vector contains NaN or infinite values")
    return v


def _num_chunks(size: int, slots: int) -> int:
    return -(-size // slots)


class CKKSKeyHolder:
    """A client's CKKS context with the secret key: encrypts ``[D]`` vectors, decrypts sums.

    The keys come from SEAL's CSPRNG. All clients of a federation share this key (see the
    module docstring); ``public_context()`` is what the server gets.
    """

    def __init__(self, params: CKKSParams | None = None) -> None:
        self.params = params = CKKSParams() if params is None else params
        validate_params(params)
        self.context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=(
                ts.ENCRYPTION_TYPE.SYMMETRIC if params.symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
            ),
        )
        self.context.global_scale = 2.0**params.global_scale_bits
        seal_context = self.context.seal_context().data
        secret_key = self.context.secret_key().data
        self._encoder = sealapi.CKKSEncoder(seal_context)
        self._encryptor = sealapi.Encryptor(
            seal_context, secret_key if params.symmetric else self.context.public_key().data
        )
        self._decryptor = sealapi.Decryptor(seal_context, secret_key)
        self._wire = _Wire(seal_context)

    def public_context(self) -> bytes:
        """The serialized context for the server: parameters (and, in public-key mode, the
        public key), no secret key and no evaluation keys (additions need none)."""
        return self.context.serialize(
            save_public_key=not self.params.symmetric,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )

    def encrypt(self, x: np.ndarray) -> list[bytes]:
        """Encrypt a ``[D]`` vector into ``ceil(D / slots)`` serialized ciphertexts."""
        v = _as_vector(x)
        limit = self.params.max_abs_value
        if v.size and np.abs(v).max() > limit:
            raise ValueError(
                f"values reach {np.abs(v).max():.4g}, above the {limit:.4g} that "
                f"CKKSParams(global_scale_bits={self.params.global_scale_bits}) can encrypt; "
                "lower global_scale_bits or clip the vector"
            )
        slots, scale = self.params.slots, self.context.global_scale
        plain = sealapi.Plaintext()
        out = []
        for start in range(0, v.size, slots):
            self._encoder.encode(v[start : start + slots].tolist(), scale, plain)
            if self.params.symmetric:
                out.append(self._wire.dump(self._encryptor.encrypt_symmetric(plain)))
            else:
                ciphertext = sealapi.Ciphertext()
                self._encryptor.encrypt(plain, ciphertext)
                out.append(self._wire.dump(ciphertext))
        return out

    def decrypt(self, ciphertexts: Sequence[bytes], size: int) -> np.ndarray:
        """Decrypt serialized ciphertexts of a ``[size]`` vector into float64."""
        slots = self.params.slots
        if len(ciphertexts) != _num_chunks(size, slots):
            raise ValueError(
                f"{len(ciphertexts)} ciphertexts cannot hold a vector of {size} values "
                f"({_num_chunks(size, slots)} needed at {slots} slots each)"
            )
        out = np.empty(len(ciphertexts) * slots)
        plain = sealapi.Plaintext()
        for n, blob in enumerate(ciphertexts):
            self._decryptor.decrypt(self._wire.load(blob), plain)
            out[n * slots : (n + 1) * slots] = self._encoder.decode_double(plain)
        return out[:size]


class EncryptedSum:
    """A running sum of encrypted vectors, kept by a party without the secret key (the server,
    or a ring member relaying): ``add`` one client's ciphertexts at a time."""

    def __init__(self, public_context: bytes) -> None:
        self.context = ts.context_from(public_context)
        if self.context.has_secret_key():
            raise ValueError(
                "EncryptedSum got a context holding the secret key; pass "
                "CKKSKeyHolder.public_context() so the aggregator cannot decrypt"
            )
        seal_context = self.context.seal_context().data
        self._evaluator = sealapi.Evaluator(seal_context)
        self._encoder = sealapi.CKKSEncoder(seal_context)
        self._slots = self._encoder.slot_count()
        self._wire = _Wire(seal_context)
        self._sum: list[sealapi.Ciphertext] = []

    def add(self, ciphertexts: Sequence[bytes]) -> None:
        """Add one encrypted vector (its serialized ciphertexts) to the sum."""
        if self._sum and len(ciphertexts) != len(self._sum):
            raise ValueError(
                f"cannot add {len(ciphertexts)} ciphertexts to a sum of {len(self._sum)}: the "
                "vectors differ in length"
            )
        if not self._sum:
            self._sum = [self._wire.load(blob) for blob in ciphertexts]
            return
        for total, blob in zip(self._sum, ciphertexts, strict=True):
            self._evaluator.add_inplace(total, self._wire.load(blob))

    def subtract_plain(self, x: np.ndarray) -> None:
        """Subtract a plaintext ``[D]`` vector (encoded at the sum's scale) from the sum."""
        v = _as_vector(x)
        if _num_chunks(v.size, self._slots) != len(self._sum):
            raise ValueError(f"a vector of {v.size} values does not match the encrypted sum")
        plain = sealapi.Plaintext()
        for n, total in enumerate(self._sum):
            chunk = v[n * self._slots : (n + 1) * self._slots].tolist()
            self._encoder.encode(chunk, total.parms_id(), total.scale, plain)
            self._evaluator.sub_plain_inplace(total, plain)

    def serialize(self) -> list[bytes]:
        """The encrypted sum as serialized ciphertexts, for a key holder to decrypt."""
        return [self._wire.dump(total) for total in self._sum]


def _as_clients(vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"vectors must be [K, D] with K >= 1, got shape {x.shape}")
    return x


def _check_budget(x: np.ndarray, limit: float, what: str) -> None:
    """Each client may use ``limit`` of the magnitude budget, so that the sum cannot overflow."""
    peaks = np.abs(x).max(axis=1) if x.size else np.zeros(len(x))
    worst = int(np.argmax(peaks))
    if peaks[worst] > limit:
        raise ValueError(
            f"client {worst}'s values reach {peaks[worst]:.4g} but {what} each client must stay "
            f"below {limit:.4g} for the encrypted sum to fit; lower "
            "CKKSParams.global_scale_bits or clip the updates"
        )


def ckks_sum(vectors: np.ndarray, key_holder: CKKSKeyHolder) -> tuple[np.ndarray, dict[str, float]]:
    """Sum ``[K, D]`` client vectors under CKKS: each client encrypts its row, the server streams
    them into one encrypted sum with the public context, the key holder decrypts.

    Returns the ``[D]`` float64 sum and stats: ``client_s`` (mean encryption seconds per
    client), ``server_s`` (adding and serializing the sum), ``decrypt_s``, ``bytes_per_client``
    (ciphertext bytes a client uploads), ``result_bytes`` (the encrypted sum sent back),
    ``context_bytes`` (the server's context, sent once) and ``plain_bytes_per_client`` (4 D).
    """
    x = _as_clients(vectors)
    K, D = x.shape
    _check_budget(x, key_holder.params.max_abs_value / K, f"with {K} clients")
    public = key_holder.public_context()
    server = EncryptedSum(public)
    client_s = server_s = 0.0
    uploaded = 0
    for i in range(K):
        start = time.perf_counter()
        blobs = key_holder.encrypt(x[i])
        client_s += time.perf_counter() - start
        uploaded += sum(map(len, blobs))
        start = time.perf_counter()
        server.add(blobs)
        server_s += time.perf_counter() - start
    start = time.perf_counter()
    result = server.serialize()
    server_s += time.perf_counter() - start
    start = time.perf_counter()
    total = key_holder.decrypt(result, D)
    decrypt_s = time.perf_counter() - start
    return total, {
        "client_s": client_s / K,
        "server_s": server_s,
        "decrypt_s": decrypt_s,
        "bytes_per_client": uploaded / K,
        "result_bytes": float(sum(map(len, result))),
        "context_bytes": float(len(public)),
        "plain_bytes_per_client": 4.0 * D,
    }


def ring_mask(size: int, sigma: float) -> np.ndarray:
    """A fresh ``[size]`` Gaussian mask ``R`` for the initiator, from the OS CSPRNG.

    Only the initiator ever holds it; it is not derived from the run's seed (which
    ``config.json`` records), so nobody else can recompute it.
    """
    return os_normal(size, sigma)


def ckks_ring_sum(
    vectors: np.ndarray,
    key_holder: CKKSKeyHolder,
    *,
    round_idx: int,
    sigma: float = 1e4,
) -> tuple[np.ndarray, dict[str, float]]:
    """PPPML-HMI cyclic secure sum of ``[K, D]`` client vectors.

    The initiator (client ``round_idx mod K``) encrypts its row plus ``ring_mask(D, sigma)``;
    clients ``initiator + 1, ...`` (mod K) in turn add their encrypted
    row to the travelling ciphertext; the initiator subtracts the mask, decrypts, and uploads
    the plaintext sum to the server. Returns the ``[D]`` float64 sum and stats: ``client_s``
    (mean seconds per client), ``initiator_s``, ``round_s`` (sum over the sequential hops),
    ``server_s`` (0: the server only relays), ``bytes_per_client`` (mean bytes sent, the
    initiator's plaintext upload included) and ``plain_bytes_per_client`` (4 D).
    """
    x = _as_clients(vectors)
    K, D = x.shape
    if not sigma > 0:
        raise ValueError(f"the ring mask sigma must be positive, got {sigma}")
    initiator = round_idx % K
    seconds, sent = np.zeros(K), np.zeros(K)

    start = time.perf_counter()
    mask = ring_mask(D, sigma)
    limit = key_holder.params.max_abs_value
    budget = limit - (np.abs(mask).max() if D else 0.0)
    if budget <= 0:
        raise ValueError(
            f"the ring mask (sigma={sigma:g}) alone exceeds the {limit:.4g} CKKS values can "
            "reach; lower CKKSParams.global_scale_bits or the mask sigma"
        )
    _check_budget(x, budget / K, f"with {K} clients and the ring mask")
    public = key_holder.public_context()
    message = key_holder.encrypt(x[initiator] + mask)
    seconds[initiator] += time.perf_counter() - start
    sent[initiator] += sum(map(len, message))

    for hop in range(1, K):
        client = (initiator + hop) % K
        start = time.perf_counter()
        running = EncryptedSum(public)
        running.add(message)
        running.add(key_holder.encrypt(x[client]))
        message = running.serialize()
        seconds[client] += time.perf_counter() - start
        sent[client] += sum(map(len, message))

    start = time.perf_counter()
    running = EncryptedSum(public)
    running.add(message)
    running.subtract_plain(mask)
    total = key_holder.decrypt(running.serialize(), D)
    seconds[initiator] += time.perf_counter() - start
    sent[initiator] += 4.0 * D
    return total, {
        "client_s": float(seconds.mean()),
        "initiator_s": float(seconds[initiator]),
        "round_s": float(seconds.sum()),
        "server_s": 0.0,
        "bytes_per_client": float(sent.mean()),
        "plain_bytes_per_client": 4.0 * D,
    }
