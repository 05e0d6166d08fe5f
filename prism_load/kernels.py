"""Decode kernels that run without the interpreter lock: bit unpacking and group dequantisation, compiled
once with TorchScript.

Why: on a CPU a cache miss or a prefetch is a decode, a few dozen torch calls per expert. Called from
Python, each call takes the interpreter lock between kernels, and a prefetch thread decoding beside the
compute thread (also Python between its kernels) slows it, since each waits for the lock the other holds
(the runtime bench's overlap probe measures what a decoding thread costs the compute). A TorchScript
function runs its whole body in C++ with the lock released, so the same work beside the compute costs it far
less (bench/results/runtime.md has the current probe). The bodies use only torch ops that give
the same bits wherever they run; where torch cannot script them they run as plain Python (`python(name)`
returns that version; the tests hold the two to bit equality).

TorchScript is deprecated in favour of torch.compile, which needs a C++ toolchain at run time; these
kernels need nothing. The deprecation warning is silenced for the one compile.
"""

from __future__ import annotations

import warnings

import torch


def unpack_codes_into(packed: torch.Tensor, bits: int, cols: int, out: torch.Tensor) -> None:
    """out [rows, cols] (any float or integer dtype) <- the codes of pack_bits' little-endian bitstream rows
    (uint8 [rows, ceil(cols*bits/8)]): value j of a row is bits j*bits .. j*bits+bits-1 of the row."""
    rows = packed.shape[0]
    nbytes = packed.shape[1]
    mask = (1 << bits) - 1
    if bits == 8:
        out.copy_(packed[:, :cols])
    elif 8 % bits == 0:  # 2 and 4 bits never straddle a byte: each byte holds `per` values
        per = 8 // bits
        whole = nbytes * per == cols
        dst = out if whole else torch.empty([rows, nbytes * per], dtype=out.dtype, device=out.device)
        view = dst.view(rows, nbytes, per)
        for k in range(per):
            view[:, :, k].copy_(torch.bitwise_and(torch.bitwise_right_shift(packed, k * bits), mask))
        if not whole:
            out.copy_(dst[:, :cols])
    else:  # 3, 5, 6 bits straddle bytes: a word of whole bytes holds a whole number of values
        bpw = 5 if bits == 5 else 3  # bytes per word: 8 values of 5 bits; 8 of 3 or 4 of 6 in 24 bits
        vpw = 8 if bits == 5 else 24 // bits
        dt = torch.int64 if bits == 5 else torch.int32
        words = (cols + vpw - 1) // vpw
        if words * bpw > nbytes:
            packed = torch.nn.functional.pad(packed, [0, words * bpw - nbytes])
        shifts = torch.arange(vpw, dtype=dt, device=packed.device) * bits
        step = max(1, 262144 // max(cols, 1))  # rows per pass: the word temporaries stay about a MiB
        for r in range(0, rows, step):
            v = packed[r : r + step].reshape(-1, words, bpw)
            n = v.shape[0]
            w = v[:, :, 0].to(dt)
            for i in range(1, bpw):
                w = torch.bitwise_or(w, torch.bitwise_left_shift(v[:, :, i].to(dt), 8 * i))
            vals = torch.bitwise_and(torch.bitwise_right_shift(w.unsqueeze(-1), shifts), mask)  # [n, words, vpw]
            if words * vpw == cols:
                out[r : r + n].view(n, words, vpw).copy_(vals)
            else:
                out[r : r + n].copy_(vals.view(n, words * vpw)[:, :cols])


def dequantize_into(packed: torch.Tensor, bits: int, cols: int, scales: torch.Tensor, zeros: torch.Tensor,
                    g: int, out: torch.Tensor) -> torch.Tensor:
    """out (fp32 [rows, cols]) <- (code - zero) * scale per group of g input channels, in place: the codes,
    then a sub and a mul over the whole groups and over a partial last group. fp16 scales and zeros are
    widened exactly, so the bits equal (q - z) * s computed in fp32. `packed` is the bitstream as stored,
    or (bits == 8) the codes themselves."""
    unpack_codes_into(packed, bits, cols, out)
    apply_groups(out, scales, zeros, g)
    return out


def apply_groups(out: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int) -> None:
    """out (fp32 [rows, cols], holding codes) <- (out - zero) * scale per group of g columns, in place."""
    rows = out.shape[0]
    cols = out.shape[1]
    full = cols // g
    if full > 0:
        body = out if full * g == cols else out[:, : full * g]
        body.view(rows, full, g).sub_(zeros[:, :full].unsqueeze(-1)).mul_(scales[:, :full].unsqueeze(-1))
    if full * g < cols:
        out[:, full * g :].sub_(zeros[:, full : full + 1]).mul_(scales[:, full : full + 1])


INT_PART_FIELDS = 10  # per projection in decode_int_expert's meta


def decode_int_expert(raw: torch.Tensor, raw16: torch.Tensor, out: torch.Tensor, meta: list[int]) -> None:
    """A whole expert of `int` projections, from its stored bytes to fp32 weights, in one call: raw (uint8)
    and raw16 (the same bytes as fp16) are the stored range, out (fp32) the destination buffer. meta holds
    INT_PART_FIELDS integers per projection: qweight byte offset, rows, packed bytes per row, scales and
    zeros offsets (fp16 elements), groups, bits, columns, group size, destination offset (fp32 elements)."""
    for i in range(0, len(meta), 10):  # 10 == INT_PART_FIELDS (a TorchScript body cannot read module constants)
        q_start, rows, packed_cols, s_start, z_start = meta[i], meta[i + 1], meta[i + 2], meta[i + 3], meta[i + 4]
        groups, bits, cols, g, dst = meta[i + 5], meta[i + 6], meta[i + 7], meta[i + 8], meta[i + 9]
        packed = raw[q_start : q_start + rows * packed_cols].view([rows, packed_cols])
        scales = raw16[s_start : s_start + rows * groups].view([rows, groups])
        zeros = raw16[z_start : z_start + rows * groups].view([rows, groups])
        dequantize_into(packed, bits, cols, scales, zeros, g, out[dst : dst + rows * cols].view([rows, cols]))


def _script(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice: see the module docstring
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 - a torch without TorchScript: the same function in Python
        return fn


_PY = {"unpack_codes_into": unpack_codes_into, "apply_groups": apply_groups, "dequantize_into": dequantize_into,
       "decode_int_expert": decode_int_expert}
unpack_codes_into = _script(unpack_codes_into)
apply_groups = _script(apply_groups)
dequantize_into = _script(dequantize_into)
decode_int_expert = _script(decode_int_expert)
SCRIPTED = isinstance(dequantize_into, torch.jit.ScriptFunction)


def python(name: str):
    """The plain-Python version of a kernel (tests hold the scripted one to it)."""
    return _PY[name]
