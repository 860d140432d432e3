"""SecAgg+ secure summation (Bell et al., CCS 2020), simulated for K clients in one process.

The protocol of Flower's SecAgg+ workflow, with real cryptography from ``cryptography``:

0. *Advertise keys*: every client makes two X25519 key pairs, one whose agreements seed the
   pairwise masks and one whose agreements key the encryption of secret shares.
1. *Share keys*: every client draws a self-mask seed ``b_i`` and Shamir-shares ``b_i`` and its
   mask private key, ``t``-of-``(k + 1)`` over its ``k`` neighbours and itself (Flower's
   ``num_shares = k + 1``). Each neighbour's pair of shares travels encrypted with
   ChaCha20-Poly1305 under ``HKDF(X25519(share keys))``; the server only relays.
2. *Masked input*: every client quantizes its vector (``jaxfl.secure.quantize``) into
   ``Z_{2^m}`` and adds ``PRG(b_i)`` plus ``+-PRG(s_ij)`` for each neighbour ``j`` that shared
   keys (``s_ij = HKDF(X25519(mask keys))``, ``+`` when ``i < j``); the PRG is the AES-256-CTR
   keystream. The pairwise masks cancel in the sum.
3. *Unmask*: surviving share holders reveal their share of ``b_i`` for each client that sent
   a masked input and their share of the mask key for each client that shared keys but dropped
   before sending it; the server reconstructs them (``t`` shares each), strips the self masks
   and the dropped clients' pairwise masks, and is left with the sum of the survivors'
   quantized vectors.

Neighbourhoods are Bell et al.'s Harary graph: clients sit on a ring in a random order and each
links to ``neighbours / 2`` clients on either side (``neighbours >= K - 1``: complete graph).
Clients may drop after each of stages 0, 1 and 2; whenever a secret needed for unmasking has
fewer than ``t`` surviving share holders, or fewer than ``t`` clients remain, ``SecAggError``
is raised: the protocol never returns a wrong sum.

Trust model: semi-honest server and clients; the server learns the survivors' sum only, and no
coalition of fewer than ``t`` share holders learns a client's secrets. Requiring
``t > (k + 1) / 2``
stops a server that lies about who dropped from collecting both ``b_i`` and the mask key of
one client (honest clients reveal one or the other, never both).

Determinism: the neighbour graph, the dropouts and the stochastic rounding come from numpy
Generators seeded by ``(seed, round_idx)``; key material (X25519 keys, self-mask seeds, Shamir
coefficients, nonces) comes from the OS CSPRNG. Masks cancel exactly, so the unmasked integer
sum, and the float sum dequantized from it, are bit-for-bit reproducible run to run even though
every key and ciphertext differs.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from jaxfl.secure.entropy import OsRandom
from jaxfl.secure.quantize import dequantize, quantization_rng, quantize

# A Mersenne prime above 2^256: every 32-byte secret is one field element, no chunking.
SHAMIR_PRIME = 2**521 - 1
_SHARE_BYTES = (SHAMIR_PRIME.bit_length() + 7) // 8
_KEY_BYTES = 32
_NONCE_BYTES = 12
_ID_BYTES = 4
STAGES = ("advertise_keys", "share_keys", "masked_input")
# Stream tags separating the per-round numpy streams that share (seed, round_idx).
_GRAPH_STREAM = 0x4752
_DROPOUT_STREAM = 0x4450


class SecAggError(RuntimeError):
    """The round cannot be unmasked correctly (too few surviving clients or share holders)."""


class SecAggConfig(NamedTuple):
    """SecAgg+ settings.

    threshold: Shamir reconstruction threshold ``t`` out of the ``k + 1`` shares of a secret
        (one per neighbour, one kept); an int is used as is, a float in ``(0.5, 1]`` is a
        fraction of the shares (``ceil(threshold * (k + 1))``). Must satisfy
        ``(k + 1) / 2 < t <= k + 1``.
    neighbours: ``k``, pairwise-mask partners and share holders per client; ``None`` or
        ``>= K - 1`` means the complete graph, otherwise an even number ``>= 2``.
    clip_range, quantization_bits: every coordinate is clipped to ``+-clip_range`` and mapped
        onto the integers ``[0, 2^quantization_bits]`` (Flower: 8.0 and 2^22).
    modulus_bits: masked arithmetic is modulo ``2^modulus_bits`` (Flower: 2^32); must leave room
        for the sum of ``K`` quantized values without wrapping, at most 63.
    max_weight: public bound on client weights used by ``jaxfl.secure.aggregators`` to pre-scale
        updates (``None``: the largest weight of the round).
    dropout_probs: probability that each remaining client drops after each stage of ``STAGES``
        (drawn from ``(seed, round_idx)``).
    """

    threshold: int | float = 0.66
    neighbours: int | None = None
    clip_range: float = 8.0
    quantization_bits: int = 22
    modulus_bits: int = 32
    max_weight: float | None = None
    dropout_probs: tuple[float, float, float] = (0.0, 0.0, 0.0)


def validate_config(config: SecAggConfig) -> None:
    """Check the settings that do not depend on the number of clients; raise ``ValueError``."""
    if not config.clip_range > 0:
        raise ValueError(f"SecAggConfig.clip_range must be positive, got {config.clip_range}")
    if not 1 <= config.quantization_bits < config.modulus_bits <= 63:
        raise ValueError(
            "SecAggConfig needs 1 <= quantization_bits < modulus_bits <= 63, got "
            f"quantization_bits={config.quantization_bits}, modulus_bits={config.modulus_bits}"
        )
    if config.max_weight is not None and not config.max_weight > 0:
        raise ValueError(
            f"SecAggConfig.max_weight must be positive or None, got {config.max_weight}"
        )
    probs = tuple(config.dropout_probs)
    if len(probs) != len(STAGES) or not all(0.0 <= p < 1.0 for p in probs):
        raise ValueError(
            f"SecAggConfig.dropout_probs must be {len(STAGES)} probabilities in [0, 1), one per "
            f"stage {STAGES}, got {config.dropout_probs}"
        )
    if isinstance(config.threshold, float) and not 0.5 < config.threshold <= 1.0:
        raise ValueError(
            f"a fractional SecAggConfig.threshold must lie in (0.5, 1], got {config.threshold}"
        )
    if config.neighbours is not None and config.neighbours < 1:
        raise ValueError(f"SecAggConfig.neighbours must be >= 1 or None, got {config.neighbours}")


def graph_parameters(config: SecAggConfig, num_clients: int) -> tuple[int, int]:
    """``(k, t)``: neighbours per client and the reconstruction threshold (out of ``k + 1``
    shares) for ``num_clients`` clients."""
    validate_config(config)
    K = num_clients
    if K < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {K}")
    needed = int(np.ceil(np.log2(K * 2.0**config.quantization_bits + 1)))
    if needed > config.modulus_bits:
        raise ValueError(
            f"SecAggConfig.modulus_bits={config.modulus_bits} is too small: the sum of {K} "
            f"values quantized to {config.quantization_bits} bits reaches "
            f"{K} * 2^{config.quantization_bits} and would wrap; use modulus_bits >= {needed} "
            "or fewer quantization_bits"
        )
    k = K - 1 if config.neighbours is None or config.neighbours >= K - 1 else config.neighbours
    if k < K - 1 and k % 2:
        raise ValueError(
            f"SecAggConfig.neighbours={k} must be even (each client links to neighbours/2 "
            f"clients on either side of a ring) or >= {K - 1} (complete graph) for {K} clients"
        )
    if k < min(MIN_SPARSE_NEIGHBOURS, K - 1):
        raise ValueError(
            f"SecAggConfig.neighbours={k} is too sparse for {K} clients: use at least "
            f"{MIN_SPARSE_NEIGHBOURS} "
            "(with 2, a ring, any two non-adjacent dropouts split the survivors into groups "
            "whose sums the server would learn), or 0 for the complete graph"
        )
    if isinstance(config.threshold, float):
        # The epsilon keeps e.g. 0.56 * 25 = 14.000000000000002 at 14, not 15.
        t = int(np.ceil(config.threshold * (k + 1) - 1e-9))
    else:
        t = int(config.threshold)
    if not (k + 1) // 2 < t <= k + 1:
        raise ValueError(
            f"SecAgg+ threshold t={t} must satisfy {(k + 1) // 2} < t <= {k + 1} for {k + 1} "
            "shares per secret (more than half, so a server cannot obtain both secrets of one "
            "client)"
        )
    return k, t


# A sparse Harary graph with k neighbours stays connected after any k - 1 dropouts; k = 2 (a
# ring) splits after two non-adjacent ones, so jaxfl requires k >= 4 for sparse graphs. A floor,
# not a proof: enough dropouts split any sparse graph, and what stops the server from learning
# partial sums is the check of every round's surviving graph (survivor_components).
MIN_SPARSE_NEIGHBOURS = 4


def survivor_components(graph: list[np.ndarray], survivors: Collection[int]) -> list[list[int]]:
    """Connected components of the neighbour graph restricted to ``survivors`` (sorted ids).

    The pairwise masks of two survivors cancel only in a sum over both, so after unmasking the
    server can compute the sum of every component: more than one component leaks partial sums.
    """
    alive = set(int(i) for i in survivors)
    seen: set[int] = set()
    components = []
    for start in sorted(alive):
        if start in seen:
            continue
        stack, part = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            part.append(i)
            for j in graph[i]:
                if int(j) in alive and int(j) not in seen:
                    seen.add(int(j))
                    stack.append(int(j))
        components.append(sorted(part))
    return components


def neighbour_sets(
    num_clients: int, neighbours: int, seed: int, round_idx: int
) -> list[np.ndarray]:
    """Sorted neighbour ids of each client this round: the complete graph when
    ``neighbours >= num_clients - 1``, else a random ring order (from ``(seed, round_idx)``) with
    each client linked to the ``neighbours / 2`` clients on either side."""
    K = num_clients
    if neighbours >= K - 1:
        return [np.array([j for j in range(K) if j != i]) for i in range(K)]
    order = np.random.default_rng([seed, round_idx, _GRAPH_STREAM]).permutation(K)
    position = np.argsort(order)
    offsets = np.concatenate(
        [np.arange(1, neighbours // 2 + 1), -np.arange(1, neighbours // 2 + 1)]
    )
    return [np.sort(order[(position[i] + offsets) % K]) for i in range(K)]


def shamir_split(secret: int, threshold: int, xs: Sequence[int]) -> list[int]:
    """Shares ``f(x)`` for each ``x`` in ``xs`` of a random polynomial of degree
    ``threshold - 1`` over GF(``SHAMIR_PRIME``) with ``f(0) = secret``: any ``threshold`` shares
    recover the secret, fewer reveal nothing about it. Coefficients come from the OS CSPRNG."""
    if not 0 <= secret < SHAMIR_PRIME:
        raise ValueError("a Shamir secret must be an integer in [0, SHAMIR_PRIME)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(
            f"threshold must be in [1, {len(xs)}] for {len(xs)} shares, got {threshold}"
        )
    _check_points(xs)
    coeffs = [secret] + [secrets.randbelow(SHAMIR_PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % SHAMIR_PRIME
        shares.append(y)
    return shares


def shamir_reconstruct(shares: Sequence[tuple[int, int]]) -> int:
    """Lagrange interpolation at 0 through the ``(x, f(x))`` points: the secret when they number
    at least the threshold, an unrelated field element when fewer."""
    xs = [x for x, _ in shares]
    _check_points(xs)
    secret = 0
    for j, (xj, yj) in enumerate(shares):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % SHAMIR_PRIME
                den = den * (xm - xj) % SHAMIR_PRIME
        secret = (secret + yj * num * pow(den, -1, SHAMIR_PRIME)) % SHAMIR_PRIME
    return secret


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs) or not all(0 < x < SHAMIR_PRIME for x in xs):
        raise ValueError("Shamir evaluation points must be distinct and in (0, SHAMIR_PRIME)")


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes_raw()


def _agree(private: X25519PrivateKey, peer_public: bytes, purpose: bytes) -> bytes:
    """32-byte key from the X25519 agreement, bound to its purpose by the HKDF info."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    hkdf = HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=purpose)
    return hkdf.derive(shared)


def _prg(seed: bytes, size: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """``[size]`` uniform words: the AES-256-CTR keystream under ``seed``. Every seed keys one
    stream only, so the fixed initial counter block is safe."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(size * np.dtype(dtype).itemsize)), dtype)


def _aad(round_idx: int, sender: int, recipient: int) -> bytes:
    # Binds a share ciphertext to its round and direction, so the relay cannot replay or swap it.
    return struct.pack(">QII", round_idx, sender, recipient)


def _dropout_sets(
    num_clients: int,
    probs: Sequence[float],
    seed: int,
    round_idx: int,
    dropouts: Sequence[Collection[int]] | None,
) -> list[set[int]]:
    """Clients newly dropping after each stage of ``STAGES`` (explicit ids, or drawn)."""
    if dropouts is not None:
        if len(dropouts) != len(STAGES):
            raise ValueError(
                f"dropouts must give {len(STAGES)} collections of client ids, one per stage "
                f"{STAGES}, got {len(dropouts)}"
            )
        sets = [{int(i) for i in ids} for ids in dropouts]
        bad = sorted(i for s in sets for i in s if not 0 <= i < num_clients)
        if bad:
            raise ValueError(f"dropout ids {bad} are not clients 0..{num_clients - 1}")
        return sets
    rng = np.random.default_rng([seed, round_idx, _DROPOUT_STREAM])
    alive = np.arange(num_clients)
    sets = []
    for p in probs:
        drop = rng.random(alive.size) < p
        sets.append({int(i) for i in alive[drop]})
        alive = alive[~drop]
    return sets


def _require_quorum(alive: Collection[int], t: int, num_clients: int, stage: str) -> None:
    if len(alive) < t:
        raise SecAggError(
            f"SecAgg+ needs at least t={t} clients for the {stage} stage but only {len(alive)} "
            f"of {num_clients} are left; lower SecAggConfig.threshold or the dropout rate"
        )


def _recover(shares: list[tuple[int, int]], t: int, client: int, secret: str, k: int) -> int:
    if len(shares) < t:
        raise SecAggError(
            f"cannot reconstruct client {client}'s {secret}: only {len(shares)} of its {k + 1} "
            f"shares were revealed in the unmasking stage, below the threshold t={t}; lower "
            "SecAggConfig.threshold, use more neighbours, or drop fewer clients"
        )
    return shamir_reconstruct(shares[:t])


@dataclass
class _Client:
    mask_key: X25519PrivateKey
    share_key: X25519PrivateKey
    self_seed: bytes = b""
    own_b_share: int = 0
    inbox: dict[int, bytes] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_sent: int = 0


def secagg_sum_quantized(
    quantized: np.ndarray,
    config: SecAggConfig,
    *,
    seed: int,
    round_idx: int,
    dropouts: Sequence[Collection[int]] | None = None,
    server_view: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Run SecAgg+ on already quantized inputs.

    quantized: ``[K, D]`` integers in ``[0, 2^quantization_bits]``, one row per client.
    dropouts: ``None`` to draw dropouts with ``config.dropout_probs``, else one collection of
        client ids per stage of ``STAGES`` (clients dropping right after that stage).
    server_view: called with ``(client, masked_input)`` for every masked ``[D]`` vector the
        server receives, to inspect what the server sees.

    Returns ``(total, survivors, stats)``: ``total`` the ``[D]`` int64 sum of the survivors'
    rows (exact, recovered by unmasking), ``survivors`` the sorted ids whose masked input
    arrived, ``stats`` timings (client seconds are the mean over the K clients) and traffic.
    """
    q = np.asarray(quantized)
    if q.ndim != 2 or not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"quantized must be a [K, D] integer array, got {q.dtype} {q.shape}")
    K, D = q.shape
    k, t = graph_parameters(config, K)
    top = 2**config.quantization_bits
    if q.size and (q.min() < 0 or q.max() > top):
        raise ValueError(f"quantized values must lie in [0, 2^{config.quantization_bits}]")
    dtype = np.uint32 if config.modulus_bits <= 32 else np.uint64
    modulus_mask = dtype((1 << config.modulus_bits) - 1)
    graph = neighbour_sets(K, k, seed, round_idx)
    dropped = _dropout_sets(K, config.dropout_probs, seed, round_idx, dropouts)
    server_s = 0.0

    # Stage 0: advertise keys.
    clients, public = [], []
    for _ in range(K):
        start = time.perf_counter()
        client = _Client(X25519PrivateKey.generate(), X25519PrivateKey.generate())
        public.append((_raw(client.mask_key.public_key()), _raw(client.share_key.public_key())))
        client.seconds += time.perf_counter() - start
        client.bytes_sent += 2 * _KEY_BYTES
        clients.append(client)
    shared_keys = [i for i in range(K) if i not in dropped[0]]
    _require_quorum(shared_keys, t, K, "share-keys")

    # Stage 1: Shamir-share b_i and the mask key, encrypted for each neighbour.
    relay: list[dict[int, bytes]] = [{} for _ in range(K)]
    for i in shared_keys:
        start = time.perf_counter()
        client = clients[i]
        client.self_seed = os.urandom(_KEY_BYTES)
        holders = sorted([i, *(int(j) for j in graph[i])])
        xs = [j + 1 for j in holders]
        mask_secret = int.from_bytes(client.mask_key.private_bytes_raw(), "big")
        b_shares = shamir_split(int.from_bytes(client.self_seed, "big"), t, xs)
        key_shares = shamir_split(mask_secret, t, xs)
        for j, b_share, key_share in zip(holders, b_shares, key_shares, strict=True):
            if j == i:
                # The kept share of the own mask key is useless (it is needed only once the
                # client is gone), so only the b share is kept.
                client.own_b_share = b_share
                continue
            cipher = ChaCha20Poly1305(_agree(client.share_key, public[j][1], b"secagg shares"))
            nonce = os.urandom(_NONCE_BYTES)
            payload = b_share.to_bytes(_SHARE_BYTES, "big") + key_share.to_bytes(
                _SHARE_BYTES, "big"
            )
            relay[j][i] = nonce + cipher.encrypt(nonce, payload, _aad(round_idx, i, j))
            client.bytes_sent += _ID_BYTES + len(relay[j][i])
        client.seconds += time.perf_counter() - start
    in_u1 = set(shared_keys)
    masked = [i for i in shared_keys if i not in dropped[1]]
    _require_quorum(masked, t, K, "masked-input")

    # Stage 2: masked inputs; the server adds them as they arrive.
    total = np.zeros(D, dtype)
    for j in masked:
        start = time.perf_counter()
        client = clients[j]
        client.inbox = relay[j]
        y = q[j].astype(dtype)
        y += _prg(client.self_seed, D, dtype)
        for i in graph[j]:
            if int(i) in in_u1:
                mask = _prg(_agree(client.mask_key, public[i][0], b"secagg mask"), D, dtype)
                if j < i:
                    y += mask
                else:
                    y -= mask
        y &= modulus_mask
        client.bytes_sent += y.nbytes
        client.seconds += time.perf_counter() - start
        if server_view is not None:
            server_view(j, y)
        start = time.perf_counter()
        total += y
        server_s += time.perf_counter() - start
    in_u2 = set(masked)
    unmaskers = [j for j in masked if j not in dropped[2]]
    _require_quorum(unmaskers, t, K, "unmasking")
    components = survivor_components(graph, in_u2)
    if len(components) > 1:
        raise SecAggError(
            f"the dropouts split the {len(in_u2)} surviving clients into {len(components)} "
            f"groups (sizes {[len(c) for c in components]}) that share no pairwise mask: "
            "unmasking would reveal each group's sum, so the round is refused; use more "
            "SecAggConfig.neighbours (or 0, the complete graph)"
        )

    # Stage 3: each surviving holder reveals, per sender, the b share if the sender's masked
    # input arrived and the mask-key share if it did not, never both.
    b_shares_of = {i: [] for i in in_u2}
    key_shares_of = {i: [] for i in in_u1 - in_u2}
    for j in unmaskers:
        start = time.perf_counter()
        client = clients[j]
        b_shares_of[j].append((j + 1, client.own_b_share))
        client.bytes_sent += _ID_BYTES + _SHARE_BYTES
        for i, blob in client.inbox.items():
            cipher = ChaCha20Poly1305(_agree(client.share_key, public[i][1], b"secagg shares"))
            try:
                payload = cipher.decrypt(
                    blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _aad(round_idx, i, j)
                )
            except InvalidTag as err:
                raise SecAggError(
                    f"client {j} could not authenticate the shares relayed from client {i}"
                ) from err
            if i in in_u2:
                b_shares_of[i].append((j + 1, int.from_bytes(payload[:_SHARE_BYTES], "big")))
            else:
                key_shares_of[i].append((j + 1, int.from_bytes(payload[_SHARE_BYTES:], "big")))
            client.bytes_sent += _ID_BYTES + _SHARE_BYTES
        client.seconds += time.perf_counter() - start

    start = time.perf_counter()
    for i in sorted(in_u2):
        b_i = _recover(b_shares_of[i], t, i, "self-mask seed", k)
        total -= _prg(b_i.to_bytes(_KEY_BYTES, "big"), D, dtype)
    for i in sorted(in_u1 - in_u2):
        secret = _recover(key_shares_of[i], t, i, "mask key", k)
        mask_key = X25519PrivateKey.from_private_bytes(secret.to_bytes(_KEY_BYTES, "big"))
        if _raw(mask_key.public_key()) != public[i][0]:
            raise SecAggError(f"client {i}'s reconstructed mask key does not match its public key")
        for j in graph[i]:
            if int(j) in in_u2:
                mask = _prg(_agree(mask_key, public[j][0], b"secagg mask"), D, dtype)
                # Undo what survivor j added for the pair (j, i): +mask when j < i.
                if j < i:
                    total -= mask
                else:
                    total += mask
    total &= modulus_mask
    server_s += time.perf_counter() - start

    stats = {
        "client_s": sum(c.seconds for c in clients) / K,
        "server_s": server_s,
        "bytes_per_client": sum(c.bytes_sent for c in clients) / K,
        "plain_bytes_per_client": 4.0 * D,
        "survivors": float(len(masked)),
        "neighbours": float(k),
        "threshold": float(t),
    }
    dropped_counts = (
        K - len(shared_keys),
        len(shared_keys) - len(masked),
        len(masked) - len(unmaskers),
    )
    for stage, count in zip(STAGES, dropped_counts, strict=True):
        stats[f"dropped_after_{stage}"] = float(count)
    return total.astype(np.int64), np.array(sorted(in_u2), dtype=np.int64), stats


def secagg_sum(
    vectors: np.ndarray,
    config: SecAggConfig,
    *,
    seed: int,
    round_idx: int,
    dropouts: Sequence[Collection[int]] | None = None,
    server_view: Callable[[int, np.ndarray], None] | None = None,
    secure_randomness: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Securely sum ``[K, D]`` float vectors of the clients that survive the round.

    Client ``i`` quantizes its row with ``quantization_rng(seed, round_idx, i)`` before masking,
    so ``quantize`` reproduces its integers exactly; with ``secure_randomness`` its stochastic
    rounding draws from the OS CSPRNG instead (not reproducible from the seed). Returns
    ``(sum, survivors, stats)``: the ``[D]`` float64 dequantized sum of the survivors' clipped
    rows, their sorted ids, and the statistics of ``secagg_sum_quantized`` plus the
    quantization time (added to ``client_s``) and the number of clipped coordinates.
    """
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise ValueError(f"vectors must be [K, D], got shape {x.shape}")
    K, D = x.shape
    graph_parameters(config, K)
    c, bits = config.clip_range, config.quantization_bits
    quantized = np.empty((K, D), np.uint32 if bits < 32 else np.int64)
    quantize_s, clipped = 0.0, 0
    for i in range(K):
        if not np.isfinite(x[i]).all():
            raise ValueError(f"client {i}'s vector contains NaN or infinite values")
        clipped += np.count_nonzero(np.abs(x[i]) > c)
        start = time.perf_counter()
        rng = OsRandom() if secure_randomness else quantization_rng(seed, round_idx, i)
        quantized[i] = quantize(x[i], c, bits, rng)
        quantize_s += time.perf_counter() - start
    total, survivors, stats = secagg_sum_quantized(
        quantized, config, seed=seed, round_idx=round_idx, dropouts=dropouts,
        server_view=server_view,
    )  # fmt: skip
    start = time.perf_counter()
    result = dequantize(total, c, bits, len(survivors))
    stats["server_s"] += time.perf_counter() - start
    stats["client_s"] += quantize_s / K
    stats["quantize_s"] = quantize_s / K
    stats["clipped_coords"] = float(clipped)
    return result, survivors, stats
