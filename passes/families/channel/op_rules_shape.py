"""The rules of the ops that move, cut or re-cut the channel entries, and their helpers.

Concatenation along the channel dim shifts the index map (input i of `cat([a, b], 1)` sits at offset
`a.size(1)` of the output, so the consumer's input columns of b's group start there; every cat input
stays its own group). A view that merges the channel dim with inner dims scales the unit ([B, C, H, W]
-> [B, C*H*W] puts channel c at columns c*H*W .. c*H*W+H*W-1 of a following Linear); one that splits
it rescales it back. A split the map cannot follow with one channel per entry, such as the attention
head split [B, T, H*D] -> [B, T, H, D], makes the walk retry from the same seed with a coarser unit
(D: one group channel is one head), which couples q, k and v by head through
scaled_dot_product_attention or matmul / softmax / matmul and the output projection's input features
in blocks of D. A split (split, chunk, unbind) or a slice along the channel dim hands each piece the
channels inside it (a concat split apart at other boundaries); where a producer's channels span all
of its equal pieces, it is a packed projection (GPT-2's q|k|v, a gate|up FFN), and the walk retries
with the seed's entries as that many parts: channel j is then entries j of each part, and each piece
carries one part. A grouped-query q|k|v of sizes [4D, D, D] is cut into parts of units 4u, u, u. A
view into [.., 3, H, D] (timm's qkv) does the same through the map (equal parts only).
"""
from __future__ import annotations

import math

import torch.fx as fx

from .index_map import IndexMap
from .visit import Visit, _arg, _Coarser, _norm_dim, _rank, _Reject, _where, op_name, shape_of

_VIEW = {"view", "reshape", "_unsafe_view"}
_SPLIT = {"split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "chunk", "unbind"}


# ---- cat --------------------------------------------------------------------------------------
def _cat(v: Visit):
    u, d, imap = v.u, v.d, v.imap
    tensors = list(u.args[0])
    dim = _norm_dim(int(_arg(u, 1, "dim", 0)), _rank(u))
    if dim != d:   # along batch / spatial / tokens: every input carries the same channels (like add)
        return [(t, d) for t in tensors if isinstance(t, fx.Node)] + [(u, d)], None
    sizes = []
    for t in tensors:
        st = shape_of(t)
        if st is None or len(st) <= dim:
            raise _Reject(f"no shape metadata for input {getattr(t, 'name', t)} of {_where(u)}")
        sizes.append(st[dim])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if v.is_out:
        # the group's entries must come from one input: that input's group continues backwards
        lo, hi = imap.start, imap.end(v.channels or 0)
        for t, start, size in zip(tensors, starts, sizes):
            if start <= lo and hi <= start + size:
                return [(t, dim, imap.shifted(-start)), (u, dim, imap)], None
        raise _Reject(f"channels {lo}..{hi - 1} of {_where(u)} span several of its inputs "
                      f"(a layer's channels would be split across groups)")
    hits = [i for i, t in enumerate(tensors) if t is v.m]
    if len(hits) != 1:
        raise _Reject(f"{v.m.name} is concatenated {len(hits)} times by {_where(u)}")
    return [(v.m, dim, imap), (u, dim, imap.shifted(starts[hits[0]]))], None


# ---- split, chunk, unbind, slice ------------------------------------------------------------------
def _getitem(v: Visit):
    u, d = v.u, v.d
    src, index = u.args[0], u.args[1]
    if v.is_out and op_name(src) in _SPLIT:
        members, _ = _follow_split(src, d, v.imap, v.channels, v.maps, piece=int(index))
        return members, None   # the split's role is taken when the walk reaches its input
    if v.is_out:
        return [(src, d), (u, d)], None
    # u selects an element of a tuple-valued op whose main output carries the channel
    if not u.users:
        return [], None
    s = shape_of(u)
    if s is None or len(s) <= d:
        raise _Reject(f"channel dim flows into element {index} of {_where(src)}, which does not carry it")
    return [(src, d), (u, d)], None


def _split(v: Visit):
    if v.m is not v.u.args[0]:
        raise v.non_data()
    return _follow_split(v.u, v.d, v.imap, v.channels, v.maps)


def _follow_split(s, d, imap, channels, maps, piece=None):
    """split / chunk / unbind, reached from its input (piece None; d is the input's dim) or back
    from the getitem of piece `piece` (d is the piece's dim). A split along the channel dim hands
    each piece the channels inside it; a packed projection's parts go one to a piece.
    Role "split": prune_channels rewrites the piece sizes."""
    x = s.args[0]
    unbind = op_name(s) == "unbind"
    dim, sizes = split_pieces(s)
    pieces = [(int(g.args[1]), g) for g in s.users if op_name(g) == "getitem"]
    dx = d + (1 if unbind and piece is not None and dim <= d else 0)
    if dx != dim:   # along another dim: every piece carries the channels at the same place
        dp = dx - (1 if unbind and dim < dx else 0)
        return [(x, dx)] + [(g, dp) for _, g in pieces], "split"
    if unbind:
        raise _Reject(f"{_where(s)} unbinds the channel dim")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    xmap = imap if piece is None else maps.get(x)
    if xmap is None:   # reached from one piece first: the group lies within that piece
        return [(x, dx, imap.shifted(starts[piece]))], None
    members = [(x, dx, xmap)]
    try:
        for i, g in pieces:
            inside = _inside(xmap, channels, starts[i], starts[i] + sizes[i])
            if inside is not None:
                members.append((g, dx, inside))
        return members, "split"
    except _Reject:
        pass
    weights = _packing(xmap, channels, sizes)
    if weights is not None:
        raise _packed(_where(s), weights)
    raise _Reject(f"channels {xmap.start}..{xmap.end(channels) - 1} of {x.name} span several of the "
                  f"pieces {sizes} {_where(s)} splits them into")


def split_pieces(s: fx.Node) -> tuple[int, list[int]]:
    """(dim, piece sizes) of a split / split_with_sizes / chunk / unbind node."""
    name = op_name(s)
    sx = shape_of(s.args[0])
    if sx is None:
        raise _Reject(f"no shape metadata for the input of {_where(s)}")
    dim = _norm_dim(int(_arg(s, 2 if name != "unbind" else 1, "dim", 0)), len(sx))
    size = sx[dim]
    if name == "unbind":
        return dim, [1] * size
    arg = s.args[1]
    if name == "chunk":
        step = -(-size // int(arg)) if size else 1
        return dim, [min(step, size - i) for i in range(0, size, step)]
    if isinstance(arg, (list, tuple)):
        if not all(isinstance(z, int) for z in arg):
            raise _Reject(f"{_where(s)}: symbolic piece sizes")
        return dim, list(arg)
    if not isinstance(arg, int) or arg <= 0:
        raise _Reject(f"{_where(s)}: symbolic piece size")
    return dim, [min(arg, size - i) for i in range(0, size, arg)]


def _slice(v: Visit):
    u, d, imap, channels = v.u, v.d, v.imap, v.channels
    x = u.args[0]
    v.data_only(x)
    dim, start, end, step = slice_bounds(u)
    if dim != d:
        return [(x, d), (u, d)], None
    if step != 1:
        raise _Reject(f"{_where(u)} slices the channel dim with step {step}")
    xmap = imap if not v.is_out else v.maps.get(x)
    if xmap is None:   # reached from the slice first: the group lies within it
        return [(x, d, imap.shifted(start))], None
    members = [(x, d, xmap)]
    try:
        inside = _inside(xmap, channels, start, end)
    except _Reject:
        weights = _packing(xmap, channels, _slice_pieces(x, d))
        if weights is not None:
            raise _packed(f"the slices of {x.name} ({_where(u)} and its siblings)", weights) from None
        raise _Reject(f"{_where(u)} slices {start}..{end - 1} out of channels {xmap.start}.."
                      f"{xmap.end(channels) - 1}, cutting through them") from None
    if inside is not None:
        members.append((u, d, inside))
    return members, "slice"   # prune_channels moves the bounds past the removed entries


def slice_bounds(u: fx.Node) -> tuple[int, int, int, int]:
    """(dim, start, end, step) of an aten.slice node, clamped to its input's size like Python."""
    sx = shape_of(u.args[0])
    if sx is None:
        raise _Reject(f"no shape metadata for the input of {_where(u)}")
    dim = _norm_dim(int(_arg(u, 1, "dim", 0)), len(sx))
    start, end, step = _arg(u, 2, "start", None), _arg(u, 3, "end", None), _arg(u, 4, "step", 1)
    if not all(isinstance(v, int) or v is None for v in (start, end, step)):
        raise _Reject(f"{_where(u)}: symbolic slice bounds")
    start, end, _ = slice(start, end, step).indices(sx[dim])
    return dim, start, max(start, end), step


def _slice_pieces(x: fx.Node, d: int) -> list[int]:
    """The pieces that the step-1 slices of `x` along dim `d` cut it into, as sizes: every slice
    bound is a cut (Phi-3's qkv[..., :q], qkv[..., q:q+kv], qkv[..., q+kv:] give [q, kv, kv]).
    Empty where some piece is read by no slice (that is a layer's channels cut through, not a
    packed projection taken apart)."""
    size = shape_of(x)[d]
    bounds = []
    for user in x.users:
        if op_name(user) == "slice" and user.args[0] is x:
            dim, start, end, step = slice_bounds(user)
            if dim == d and step == 1 and end > start:
                bounds.append((start, end))
    cuts = sorted({0, size, *(c for b in bounds for c in b)})
    pieces = list(zip(cuts, cuts[1:]))
    if not all(any(s <= a and b <= e for s, e in bounds) for a, b in pieces):
        return []
    return [b - a for a, b in pieces]


def _inside(xmap: IndexMap, channels: int, a: int, b: int) -> IndexMap | None:
    """The map, within the piece [a, b) of a dim, of the group `xmap` describes on the whole dim:
    None where no entry of the group lies in the piece. Raises _Reject where a part of the group
    lies partly in it (the caller may know a coarser map that would not)."""
    inside = [(o, u) for o, u in xmap.parts if a <= o and o + channels * u <= b]
    if any(o < b and o + channels * u > a for o, u in xmap.parts if (o, u) not in inside):
        raise _Reject(f"entries {xmap.start}..{xmap.end(channels) - 1} lie partly in {a}..{b - 1}")
    if not inside:
        return None
    return IndexMap(tuple(inside)).shifted(-a)


def _packing(xmap: IndexMap, channels: int, sizes: list[int]) -> tuple[int, ...] | None:
    """Where a group that is its whole dim is cut into pieces of `sizes` (a packed q|k|v, gate|up),
    the relative part sizes to walk again with: channel j is then entries j of each part, one part
    per piece (a grouped-query q|k|v gives (rep, 1, 1)). None where the pieces cannot share the
    channels out evenly."""
    if len(sizes) < 2 or 0 in sizes or not xmap.covers(channels, sum(sizes)):
        return None
    g = math.gcd(*sizes)
    if g % xmap.parts[0][1] or g // xmap.parts[0][1] < 2:   # one channel in all: nothing to choose
        return None
    return tuple(z // g for z in sizes)


def _packed(where: str, weights: tuple[int, ...]) -> _Coarser:
    shape = (f"{len(weights)} equal parts" if len(set(weights)) == 1
             else f"{len(weights)} parts of relative sizes {list(weights)}")
    return _Coarser(f"{where} cuts the channels into {shape} (a packed projection; followed as parts)",
                    [(1, weights)])


# ---- views and expand ----------------------------------------------------------------------------
def _shapes(v: Visit, x: fx.Node) -> tuple[tuple, tuple]:
    sin, sout = shape_of(x), shape_of(v.u)
    if sin is None or sout is None:
        raise _Reject(f"no shape metadata at {_where(v.u)}")
    return sin, sout


def _reshape(v: Visit):
    u, d, imap = v.u, v.d, v.imap
    x = u.args[0]
    v.data_only(x)
    sin, sout = _shapes(v, x)
    src, dst = (sout, sin) if v.is_out else (sin, sout)
    what = f"channel dim flows into {_where(u)}, which merges or splits it {tuple(sin)} -> {tuple(sout)}"
    try:
        j, jmap = _follow_reshape(src, dst, d, imap, v.channels)
    except _Coarser as e:
        ways = ", ".join(f"blocks of {f}" if len(w) == 1 else f"{len(w)} parts" + (f" in blocks of {f}" if f > 1 else "")
                         for f, w in e.requests)
        raise _Coarser(f"{what} (it can be followed as {ways})", e.requests) from None
    except _Reject:
        raise _Reject(what) from None
    (din, map_in), (dout, map_out) = ((j, jmap), (d, imap)) if v.is_out else ((d, imap), (j, jmap))
    if op_name(u) != "flatten":
        entry = list(u.args[1])[dout]
        if not isinstance(entry, int):
            raise _Reject(f"{_where(u)}: symbolic size at the channel dim")
    return [(x, din, map_in), (u, dout, map_out)], "view"


def _segments(sin, sout) -> list[tuple[range, range]] | None:
    """Aligned runs of dims with equal products: (B, T, 768) vs (B, T, 12, 64) gives B|B, T|T and
    768|12,64. Size-1 dims join a neighbouring run. None where the shapes do not align."""
    if 0 in sin or 0 in sout:
        return None
    segs, i, j = [], 0, 0
    while i < len(sin) and j < len(sout):
        i0, j0 = i, j
        pi, pj = sin[i], sout[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(sin):
                pi, i = pi * sin[i], i + 1
            elif pj < pi and j < len(sout):
                pj, j = pj * sout[j], j + 1
            else:
                return None
        segs.append((range(i0, i), range(j0, j)))
    if math.prod(sin[i:]) != 1 or math.prod(sout[j:]) != 1:
        return None
    if not segs:
        return [(range(len(sin)), range(len(sout)))]
    last_in, last_out = segs[-1]
    segs[-1] = (range(last_in.start, len(sin)), range(last_out.start, len(sout)))
    return segs


def _follow_reshape(sin, sout, din, imap, channels) -> tuple[int, IndexMap]:
    """(dim, index map) in `sout` of the entries `imap` describes along dim `din` of `sin`.

    Within the aligned run of dims that holds din, the group's entries are, in row-major order, the
    blocks [offset + j*unit, + unit) * inner of dim din in each part (offset, unit) of the map,
    repeated once per index of the dims before din (period sin[din] * inner). An output dim
    carries them
      - with the same map (scaled by inner) when it, with the dims after it, spans one period and
        the dims after it span whole blocks;
      - as one part when the map has equal, evenly spaced parts (a packed q|k|v) and it spans
        exactly one part: the parts move to the dims before it (view [B, T, 3E] -> [B, T, 3, H, D]);
      - as parts when it spans several periods: the dims before din that it takes in become the
        parts (the reverse view). Never the batch dim 0: that would tie channels to the batch size.
    Raises _Coarser with the maps that would get through (larger blocks: a split into heads; the
    whole channel dim as 2-4 parts: a packed projection), else _Reject.
    """
    segs = _segments(sin, sout)
    if segs is None:
        raise _Reject("shapes do not align")
    run_in, run_out = next(seg for seg in segs if din in seg[0])
    inner_in = math.prod(sin[din + 1: run_in.stop])
    scaled, period = imap.scaled(inner_in), sin[din] * inner_in
    equal = scaled.equal_parts()   # (width, distance) of evenly spaced parts of one width
    no_batch = math.prod(sin[max(run_in.start, 1): run_in.stop])   # the run without a leading dim 0
    whole = imap.covers(channels, sin[din])
    requests = []
    for j in run_out:
        inner = math.prod(sout[j + 1: run_out.stop])
        span = sout[j] * inner
        if sout[j] == 1:
            continue
        aligned = scaled.aligned(inner)
        width = scaled.parts[0][1]
        f = math.lcm(width, inner) // width
        if span == period:
            if aligned:
                return j, scaled.divided(inner)
            if imap.single and scaled.start == 0 and channels % f == 0:
                requests.append((f, (1,)))
        elif not imap.single and equal is not None and span == equal[1] \
                and len(scaled.parts) * equal[1] == period:
            if aligned and scaled.start + channels * width <= equal[1]:
                return j, IndexMap.block(scaled.start // inner, width // inner)
        elif imap.single and span > period and span % period == 0 and span <= no_batch:
            if aligned:
                return j, IndexMap.repeated(scaled.start // inner, width // inner, span // period,
                                            period // inner)
        elif whole and span < period and period % span == 0 and 2 <= period // span <= 4:
            parts = period // span
            g = f if width % inner else 1
            if channels % (g * parts) == 0:
                requests.append((g, (1,) * parts))
    if requests:
        raise _Coarser("needs a coarser map", requests)
    raise _Reject("not followed")


def _expand(v: Visit):
    u, d = v.u, v.d
    x = u.args[0]
    v.data_only(x)
    sx, so = _shapes(v, x)
    lead = len(so) - len(sx)
    din = d - lead if v.is_out else d
    if din < 0 or sx[din] != so[din + lead]:
        raise _Reject(f"{_where(u)} broadcasts into the channel dim")
    if not isinstance(list(u.args[1])[din + lead], int):
        raise _Reject(f"{_where(u)}: symbolic size at the channel dim")
    return [(x, din), (u, din + lead)], "view"


# ---- matmul and attention ---------------------------------------------------------------------------
def _matmul(v: Visit):
    u, m, d = v.u, v.m, v.d
    a, b = u.args[0], u.args[1]
    ra, rb, r = _rank(a), _rank(b), _rank(u)
    if min(ra, rb) < 2:
        raise _Reject(f"channel dim flows into {_where(u)}, a matrix-vector product")
    if not v.is_out and a is b:
        raise _Reject(f"{_where(u)} multiplies {m.name} with itself")
    if v.is_out:
        dout = d
    elif m is a:
        if d == ra - 1:
            raise _Reject(f"channel dim of {m.name} is contracted by {_where(u)}")
        dout = r - 2 if d == ra - 2 else d + r - ra
    elif m is b:
        if d == rb - 2:
            raise _Reject(f"channel dim of {m.name} is contracted by {_where(u)}")
        dout = r - 1 if d == rb - 1 else d + r - rb
    else:
        raise v.non_data()
    if dout == r - 2:
        return [(u, dout), (a, ra - 2)], None
    if dout == r - 1:
        return [(u, dout), (b, rb - 1)], None
    members = [(u, dout)]   # a batch dim (attention heads): both operands, unless broadcast
    for t, rt in ((a, ra), (b, rb)):
        dt = dout - (r - rt)
        if dt >= 0 and shape_of(t)[dt] != 1:
            members.append((t, dt))
        elif t is m:
            raise _Reject(f"{_where(u)} broadcasts the channel dim of {m.name}")
    return members, None


def _sdpa(v: Visit):
    """Heads of q, k, v and the output are one dim; sequence and per-head feature dims are not."""
    u, m, d, imap = v.u, v.m, v.d, v.imap
    q, k, val = u.args[:3]
    mask = _arg(u, 3, "attn_mask")
    if not v.is_out and m not in (q, k, val):
        raise _Reject(f"channel dim flows into the attention mask of {_where(u)}")
    r = _rank(u)
    if any(_rank(t) != r for t in (q, k, val)):
        raise _Reject(f"{_where(u)}: q, k, v of different ranks")
    if d >= r - 2:
        raise _Reject(f"channel dim {d} of {m.name} enters {_where(u)} as a sequence or per-head "
                      f"feature dim (only whole heads are pruned)")
    hq, hkv = shape_of(q)[d], shape_of(k)[d]
    q_map, kv_map = imap, imap
    if hq != hkv:
        rep = _gqa_repeat(u, hq, hkv)
        if not imap.single:
            raise _Reject(f"grouped-query attention {_where(u)} on heads in several parts")
        (offset, unit), = imap.parts
        if m in (k, val) and m is not q:
            q_map = IndexMap.block(offset * rep, unit * rep)
        elif offset % rep or unit % rep:
            # one kv head serves `rep` q heads: prune q heads in whole kv groups
            f = rep // math.gcd(unit, rep)
            raise _Coarser(f"grouped-query attention {_where(u)}: {hq} q heads share {hkv} k/v heads, "
                           f"q heads are pruned in groups of {rep}", [(f, (1,))])
        else:
            kv_map = IndexMap.block(offset // rep, unit // rep)
    members = [(q, d, q_map), (u, d, q_map), (k, d, kv_map), (val, d, kv_map)]
    sm = shape_of(mask) if isinstance(mask, fx.Node) else None
    if sm is not None and d - (r - len(sm)) >= 0 and sm[d - (r - len(sm))] != 1:
        members.append((mask, d - (r - len(sm)), q_map))
    return members, "attention"


def _gqa_repeat(u, hq, hkv) -> int:
    if not _arg(u, 7, "enable_gqa", False) or hkv == 0 or hq % hkv:
        raise _Reject(f"{_where(u)}: {hq} q heads and {hkv} k/v heads without enable_gqa")
    return hq // hkv
