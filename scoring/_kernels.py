"""numba kernels behind `CompiledForest`: no input checks here, callers validate.

Layout (built once by `build_layout` from scikit-learn's per-tree pre-order):
every tree is renumbered breadth-first, so that a node's children are adjacent
(`child[n]` is the left one, `child[n] + 1` the right one) and a parent comes
before its children. A leaf points to itself (`child[n] == n`) with threshold
+inf, so a walk may run `tree_depth[t]` steps for every row without testing
for leaves: the scoring loop has no branch and interleaves rows.

Thresholds are float32, rounded down from scikit-learn's float64 ones: for a
float32 x, ``x <= t64`` exactly when ``x <= round_down_to_float32(t64)``, so the
splits are the ones `sklearn.tree` takes on float32 input.

TreeSHAP (path-dependent, Lundberg et al. 2018) as in Linear TreeSHAP (Yu et
al. 2022). For a leaf l with value v, unique path features P, each with zero
fraction z_j (product of cover ratios of its edges) and one fraction o_j (1 if
x follows all its edges, else 0),

    phi_i += v (o_i - z_i) * integral_0^1 prod_{j in P, j != i} (o_j t + z_j (1 - t)) dt

(the Shapley weight |S|!(d-|S|-1)!/d! is the Beta integral of t^|S| (1-t)^(d-|S|-1)).
With Q_l(t) = prod_{j in P} q_j(t), q_j(t) = o_j t + z_j (1 - t), the integrand
is Q_l(t) a_i(t) with a_i = (o_i - z_i) / q_i, a polynomial of degree < max
depth, integrated exactly by an m-point Gauss-Legendre rule with 2m >= max depth.

a_i telescopes over the edges of feature i on the path: a_i = sum over those
edges e of (a_e - a_{e-}), a_e taken with the fractions up to e and a_{e-} with
those up to the previous edge on the same feature (0 if none). So

    phi_i = sum over edges e on feature i of  sum_k w_k G_e(t_k) (a_e - a_{e-})(t_k),

where G_e = sum of v_l Q_l over the leaves below e. Per row and tree, one
pre-order walk computes Q at each node from its parent's and, as each subtree
ends, its G and its edge's term: O(nodes x m), every node visited once. Each edge's factors depend on x
only through its state: 0 when an earlier edge on the feature was not followed
(the one fraction stays 0, the term is 0), 1 when it is cold now, 2 when hot,
so they are precomputed per node and state (`prepare_shap`). A node whose
children are both leaves is folded with them into one step (`fuse_twigs`): about
40% fewer steps, and 1.3-1.6x faster.
"""

from __future__ import annotations

import os

# numba's parallel kernels run on GNU OpenMP, whose idle threads by default spin
# for milliseconds after each parallel region: in a Serve replica or a job's actor
# called every few ms, both cores stayed busy and starved the rest of the machine
# (one process: 1.3 s of CPU for 0.13 s of work). Passive threads sleep. Read by
# libgomp when numba first starts its threads; set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402
from numba.core import config as numba_config  # noqa: E402

ROW_BLOCK = 256  # rows scored together, tree by tree, so that a tree stays in cache


@njit(cache=True)
def build_layout(roots, feature, left, right):
    """Breadth-first renumbering of every tree.

    Returns (order, child, tree_start, tree_depth): `order[new] = old` node index,
    `child[new]` the new index of the left child (right = left + 1; a leaf
    points to itself), `tree_start` of length n_trees + 1, and per-tree depth.
    """
    n_nodes = feature.shape[0]
    n_trees = roots.shape[0]
    order = np.empty(n_nodes, dtype=np.int64)
    child = np.empty(n_nodes, dtype=np.int32)
    depth_of = np.zeros(n_nodes, dtype=np.int64)
    tree_start = np.empty(n_trees + 1, dtype=np.int32)
    tree_depth = np.zeros(n_trees, dtype=np.int32)
    pos = 0
    for t in range(n_trees):
        tree_start[t] = pos
        order[pos] = roots[t]
        depth_of[pos] = 0
        head = pos
        pos += 1
        while head < pos:  # the queue is order[head:pos]
            old = order[head]
            if feature[old] < 0:
                child[head] = head
            else:
                child[head] = pos
                order[pos] = left[old]
                order[pos + 1] = right[old]
                depth_of[pos] = depth_of[head] + 1
                depth_of[pos + 1] = depth_of[head] + 1
                pos += 2
            if depth_of[head] > tree_depth[t]:
                tree_depth[t] = depth_of[head]
            head += 1
    tree_start[n_trees] = pos
    return order, child, tree_start, tree_depth


# ------------------------------------------------------------------- scoring
@njit(cache=True)
def _path_sums_block(X, start, stop, out, node, feat, thr, child, leaf_value,
                     tree_start, tree_depth):
    nb = stop - start
    for j in range(nb):
        out[start + j] = 0.0
    for t in range(tree_start.shape[0] - 1):
        root = tree_start[t]
        for j in range(nb):
            node[j] = root
        for _ in range(tree_depth[t]):
            for j in range(nb):  # independent rows: no branch, overlapped loads
                n = node[j]
                node[j] = child[n] + np.int32(X[start + j, feat[n]] > thr[n])
        for j in range(nb):
            out[start + j] += leaf_value[node[j]]


@njit(cache=True)
def path_length_sums_serial(X, feat, thr, child, leaf_value, tree_start, tree_depth):
    """Sum over trees of the path length (depth + c(leaf size)) of each row."""
    n = X.shape[0]
    out = np.empty(n)
    node = np.empty(ROW_BLOCK, dtype=np.int32)
    for start in range(0, n, ROW_BLOCK):
        _path_sums_block(X, start, min(n, start + ROW_BLOCK), out, node,
                         feat, thr, child, leaf_value, tree_start, tree_depth)
    return out


@njit(cache=True, parallel=True)
def path_length_sums_parallel(X, feat, thr, child, leaf_value, tree_start, tree_depth):
    n = X.shape[0]
    out = np.empty(n)
    n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(n_blocks):
        start = b * ROW_BLOCK
        node = np.empty(ROW_BLOCK, dtype=np.int32)
        _path_sums_block(X, start, min(n, start + ROW_BLOCK), out, node,
                         feat, thr, child, leaf_value, tree_start, tree_depth)
    return out


# ---------------------------------------------------------------- TreeSHAP
# Rows explained together, tree by tree. LLVM vectorises the row loops 32 rows
# at a time (8 doubles x 4 interleaved) and runs shorter loops scalar: a block of
# 16 never reached the vector code; 128 is 1.6-1.8x faster per row here.
SHAP_ROW_BLOCK = 128
SHAP_VECTOR_ROWS = 32

# rows of the per-record `terms` table: the factors of Q and the terms in states 1 and 2
F1, F2, E1, E2 = 0, 1, 2, 3
# columns of the per-node `code` table of the TreeSHAP layout
LEVEL, PARENT_FEATURE, IS_RIGHT, PREV_LEVEL, N_UP, TWIG = 0, 1, 2, 3, 4, 5
N_CODES = 6


@njit(cache=True)
def build_preorder(roots, feature, left, right):
    """Depth-first (pre-order, left first) renumbering of every tree.

    Returns (order, parent, level, tree_start): `order[new] = old`; `parent` in
    new indices (-1 at a root); `tree_start` of length n_trees + 1.
    """
    n_nodes = feature.shape[0]
    n_trees = roots.shape[0]
    order = np.empty(n_nodes, dtype=np.int64)
    parent = np.empty(n_nodes, dtype=np.int64)
    level = np.empty(n_nodes, dtype=np.int64)
    tree_start = np.empty(n_trees + 1, dtype=np.int32)
    stack_old = np.empty(n_nodes + 1, dtype=np.int64)
    stack_parent = np.empty(n_nodes + 1, dtype=np.int64)
    pos = 0
    for t in range(n_trees):
        tree_start[t] = pos
        stack_old[0] = roots[t]
        stack_parent[0] = -1
        top = 1
        while top > 0:
            top -= 1
            old = stack_old[top]
            p = stack_parent[top]
            order[pos] = old
            parent[pos] = p
            level[pos] = 0 if p < 0 else level[p] + 1
            if feature[old] >= 0:
                stack_old[top] = right[old]
                stack_parent[top] = pos
                stack_old[top + 1] = left[old]
                stack_parent[top + 1] = pos
                top += 2
            pos += 1
    tree_start[n_trees] = pos
    return order, parent, level, tree_start


@njit(cache=True)
def prepare_shap(feature, threshold, cover, value, parent, level, tree_start, t, w):
    """x-independent per-node tables of the TreeSHAP pass, in pre-order.

    Node c is visited as the lower end of the edge from its parent p. Returns
    (code, parent_threshold, leaf_value, fac, dif): `code[c]` holds c's LEVEL,
    p's feature, whether c IS_RIGHT, the level of the lower node of the
    previous edge on that feature higher on the path (PREV_LEVEL, 0 if none:
    the root's state is hot), and at a leaf N_UP, the number of levels whose
    subtree ends with it (-1 at internal nodes); `fac[c, s]` multiplies Q
    across the edge in state s (0 an earlier edge on the feature cold, 1 cold,
    2 hot) and `dif[c, s]` is w (a_e - a_{e-}) (0 in state 0), for each
    quadrature node of `t`, `w`.
    """
    n_nodes = feature.shape[0]
    mq = t.shape[0]
    code = np.zeros((n_nodes, 5), dtype=np.int32)
    parent_threshold = np.zeros(n_nodes, dtype=np.float32)
    leaf_value = np.zeros(n_nodes)
    fac = np.ones((n_nodes, 3, mq))
    dif = np.zeros((n_nodes, 3, mq))
    zcum = np.ones(n_nodes)  # zero fraction of the parent's feature after the edge
    for tr in range(tree_start.shape[0] - 1):
        end = tree_start[tr + 1]
        for c in range(tree_start[tr], end):
            code[c, LEVEL] = level[c]
            if feature[c] < 0:
                leaf_value[c] = value[c]
                next_level = level[c + 1] if c + 1 < end else 0
                code[c, N_UP] = level[c] - max(next_level, 1)
            else:
                code[c, N_UP] = -1
            p = parent[c]
            if p < 0:
                continue
            f = feature[p]
            code[c, PARENT_FEATURE] = f
            code[c, IS_RIGHT] = 0 if c == p + 1 else 1
            parent_threshold[c] = threshold[p]
            # the previous edge on f above p: the lower node b of (a -> b)
            pv = -1
            b = p
            a = parent[p]
            while a >= 0:
                if feature[a] == f:
                    pv = b
                    break
                b = a
                a = parent[a]
            z_prev = zcum[pv] if pv >= 0 else 1.0
            code[c, PREV_LEVEL] = level[pv] if pv >= 0 else 0
            ratio = cover[c] / cover[p]
            z_new = z_prev * ratio
            zcum[c] = z_new
            for k in range(mq):
                q_prev = t[k] + z_prev * (1.0 - t[k])
                q_new = t[k] + z_new * (1.0 - t[k])
                a_prev = (1.0 - z_prev) / q_prev  # 0 when there is no earlier edge
                fac[c, 0, k] = ratio
                fac[c, 1, k] = z_new * (1.0 - t[k]) / q_prev
                fac[c, 2, k] = q_new / q_prev
                dif[c, 1, k] = w[k] * (-1.0 / (1.0 - t[k]) - a_prev)
                dif[c, 2, k] = w[k] * ((1.0 - z_new) / q_new - a_prev)
    return code, parent_threshold, leaf_value, fac, dif


@njit(cache=True)
def fuse_twigs(tree_start, code, parent_threshold, leaf_value, fac, dif, score_value):
    """Folds every twig (an internal node, not a root, whose children are both
    leaves) into one record: its two leaves leave the walk, and the twig node
    becomes a leaf whose value depends on the row through its own split.

    About 40% of the nodes of an Isolation Forest are twig leaves, and a leaf is
    the walk's most expensive step. For each twig and each of its three cases
    (its feature's previous edge not hot: both leaves in state 0; hot and x
    goes right: left cold, right hot; hot and x goes left: left hot, right cold)
    it stores, per quadrature node, A = the sum of v * factor of the two leaves
    (so G of the twig is Q A) and B = the sum of v * factor * dif (their own
    edges' term, Q B); in case 0 the factors are the cover ratios for every
    quadrature node and the terms 0, so A is one number (`twig_a0`) and B is 0.

    Returns the kernels' tables: (tree_start, code, parent_threshold,
    leaf_value) of `prepare_shap` without the twig leaves (N_UP recomputed,
    TWIG set); `ratio`, the factor in state 0, and `terms[c]`, rows F1, F2,
    E1, E2 (the factors and terms in states 1 and 2) side by side, without the
    state-0 columns of `fac` and `dif`: 25% fewer bytes to stream, batch SHAP
    10-25% faster; then (twig_code, twig_threshold, twig_a0, twig_a, twig_b),
    `twig_code[k]` holding the twig's feature and the level of the previous
    edge on it (as its leaves' PREV_LEVEL), twig_a and twig_b cases 1 and 2;
    last (leaf_score, twig_score): `score_value` (scikit-learn's rounding of a
    leaf's path length, 0 at internal nodes) per record and of each twig's left
    and right leaf, with which the single-row walk also scores its row.
    """
    n, mq = fac.shape[0], fac.shape[2]
    n_trees = tree_start.shape[0] - 1
    is_twig = np.zeros(n, dtype=np.bool_)
    n_twigs = 0
    for tr in range(n_trees):
        end = tree_start[tr + 1]
        for c in range(tree_start[tr] + 1, end - 2):
            d = code[c, LEVEL]
            if (code[c, N_UP] < 0 and code[c + 1, N_UP] >= 0 and code[c + 2, N_UP] >= 0
                    and code[c + 1, LEVEL] == d + 1 and code[c + 2, LEVEL] == d + 1):
                is_twig[c] = True
                n_twigs += 1
    m = n - 2 * n_twigs
    new_code = np.empty((m, N_CODES), dtype=np.int32)
    new_threshold = np.empty(m, dtype=np.float32)
    new_value = np.empty(m)
    ratio = np.empty(m)
    terms = np.empty((m, 4, mq))  # F1, F2, E1, E2: one record's values side by side
    new_start = np.empty(n_trees + 1, dtype=np.int32)
    twig_code = np.empty((n_twigs, 2), dtype=np.int32)
    twig_threshold = np.empty(n_twigs, dtype=np.float32)
    twig_a0 = np.empty(n_twigs)
    twig_a = np.empty((n_twigs, 2, mq))
    twig_b = np.empty((n_twigs, 2, mq))
    leaf_score = np.empty(m)
    twig_score = np.empty((n_twigs, 2))
    pos = 0
    tw = 0
    for tr in range(n_trees):
        new_start[tr] = pos
        end = tree_start[tr + 1]
        c = tree_start[tr]
        while c < end:
            new_code[pos, :N_UP + 1] = code[c, :N_UP + 1]
            new_code[pos, TWIG] = -1
            new_threshold[pos] = parent_threshold[c]
            new_value[pos] = leaf_value[c]
            leaf_score[pos] = score_value[c]
            ratio[pos] = fac[c, 0, 0]
            terms[pos, F1] = fac[c, 1]
            terms[pos, F2] = fac[c, 2]
            terms[pos, E1] = dif[c, 1]
            terms[pos, E2] = dif[c, 2]
            if not is_twig[c]:
                pos += 1
                c += 1
                continue
            left, right = c + 1, c + 2
            next_level = code[c + 3, LEVEL] if c + 3 < end else 0
            new_code[pos, N_UP] = code[c, LEVEL] - max(next_level, 1)
            new_code[pos, TWIG] = tw
            twig_code[tw, 0] = code[left, PARENT_FEATURE]
            twig_code[tw, 1] = code[left, PREV_LEVEL]
            twig_threshold[tw] = parent_threshold[left]
            twig_score[tw, 0] = score_value[left]
            twig_score[tw, 1] = score_value[right]
            for case in range(3):
                # case 1: x goes right, the left edge cold (1), the right one hot (2); case 2: the reverse
                s_left = case
                s_right = case if case == 0 else 3 - case
                for k in range(mq):
                    gl = leaf_value[left] * fac[left, s_left, k]
                    gr = leaf_value[right] * fac[right, s_right, k]
                    if case == 0:  # factors `ratio` for every k, terms 0
                        twig_a0[tw] = gl + gr
                    else:
                        twig_a[tw, case - 1, k] = gl + gr
                        twig_b[tw, case - 1, k] = gl * dif[left, s_left, k] + gr * dif[right, s_right, k]
            tw += 1
            pos += 1
            c += 3
    new_start[n_trees] = pos
    return (new_start, new_code, new_threshold, new_value, ratio, terms,
            twig_code, twig_threshold, twig_a0, twig_a, twig_b, leaf_score, twig_score)


@njit(cache=True)
def _whole_vectors(rows):
    """`rows` rounded up to a multiple of SHAP_VECTOR_ROWS."""
    return (rows + SHAP_VECTOR_ROWS - 1) // SHAP_VECTOR_ROWS * SHAP_VECTOR_ROWS


@njit(cache=True)
def _shap_rows(X, start, stop, phi, tree_start, code, parent_threshold, leaf_value, ratio, terms,
               twig_code, twig_threshold, twig_a0, twig_a, twig_b, max_depth):
    """Adds the summed (not yet averaged) TreeSHAP values of rows start..stop to phi.

    One pre-order walk per tree serves a block of rows: the walk is the same
    for all (every row visits every node), only the edge states differ, so the
    innermost loops run over the rows of the block and are vectorised, the
    state picking the factor by selection. Per level of the current path: Q
    (`q`), the sum G of the finished children (`g`) and the edge state; per
    feature and quadrature node the sums (`acc`).
    """
    mq = terms.shape[2]
    n_features = X.shape[1]
    size = max_depth + 1
    # whole vectors of rows: a remainder runs scalar, and a 63-row chunk took as long
    # as two 64-row ones (the lanes past `stop` hold stale rows and are not written)
    nb = min(SHAP_ROW_BLOCK, _whole_vectors(stop - start))
    q = np.ones((size, mq, nb))
    g = np.zeros((size, mq, nb))
    state = np.full((size, nb), 2, dtype=np.int64)  # level 0, the root: hot
    path = np.zeros(size, dtype=np.int64)
    acc = np.empty((n_features, mq, nb))
    xt = np.zeros((n_features, nb), dtype=np.float32)
    case = np.zeros(nb, dtype=np.int64)
    for b0 in range(start, stop, nb):
        b1 = min(stop, b0 + nb)  # a short last block reuses the rows before it
        for j in range(b1 - b0):
            for f in range(n_features):
                xt[f, j] = X[b0 + j, f]
        acc[:] = 0.0
        for tr in range(tree_start.shape[0] - 1):  # tree-major: a tree's tables stay in cache
            for c in range(tree_start[tr] + 1, tree_start[tr + 1]):
                d = code[c, LEVEL]
                f = code[c, PARENT_FEATURE]
                right = np.int64(code[c, IS_RIGHT])
                pl = code[c, PREV_LEVEL]
                n_up = code[c, N_UP]
                th = parent_threshold[c]
                path[d] = c
                for j in range(nb):
                    follows = np.int64(xt[f, j] <= th) ^ right
                    state[d, j] = np.int64(state[pl, j] == 2) * (1 + follows)
                f0 = ratio[c]
                for k in range(mq):
                    f1 = terms[c, F1, k]
                    f2 = terms[c, F2, k]
                    for j in range(nb):
                        s = state[d, j]
                        q[d, k, j] = q[d - 1, k, j] * (f2 if s == 2 else (f1 if s == 1 else f0))
                if n_up < 0:
                    continue
                # a leaf: its G, its edge's term, then the edges of the subtrees it ends
                tw = code[c, TWIG]
                if tw < 0:
                    v = leaf_value[c]
                    for k in range(mq):
                        e1 = terms[c, E1, k]
                        e2 = terms[c, E2, k]
                        for j in range(nb):
                            s = state[d, j]
                            gv = v * q[d, k, j]
                            acc[f, k, j] += gv * (e2 if s == 2 else (e1 if s == 1 else 0.0))
                            g[d - 1, k, j] += gv
                else:  # a folded twig, see `fuse_twigs`
                    ft = twig_code[tw, 0]
                    hot_level = twig_code[tw, 1]
                    tth = twig_threshold[tw]
                    for j in range(nb):
                        case[j] = np.int64(state[hot_level, j] == 2) * (1 + np.int64(xt[ft, j] <= tth))
                    for k in range(mq):
                        b1_, b2_ = twig_b[tw, 0, k], twig_b[tw, 1, k]
                        for j in range(nb):
                            cs = case[j]
                            acc[ft, k, j] += q[d, k, j] * (b2_ if cs == 2 else (b1_ if cs == 1 else 0.0))
                    a0 = twig_a0[tw]
                    for k in range(mq):
                        a1, a2 = twig_a[tw, 0, k], twig_a[tw, 1, k]
                        e1 = terms[c, E1, k]
                        e2 = terms[c, E2, k]
                        for j in range(nb):
                            cs = case[j]
                            s = state[d, j]
                            gv = q[d, k, j] * (a2 if cs == 2 else (a1 if cs == 1 else a0))
                            acc[f, k, j] += gv * (e2 if s == 2 else (e1 if s == 1 else 0.0))
                            g[d - 1, k, j] += gv
                for u in range(n_up):
                    lv = d - 1 - u
                    node = path[lv]
                    fu = code[node, PARENT_FEATURE]
                    for k in range(mq):
                        e1 = terms[node, E1, k]
                        e2 = terms[node, E2, k]
                        for j in range(nb):
                            s = state[lv, j]
                            gv = g[lv, k, j]
                            acc[fu, k, j] += gv * (e2 if s == 2 else (e1 if s == 1 else 0.0))
                            g[lv - 1, k, j] += gv
                            g[lv, k, j] = 0.0
            g[0] = 0.0
        for j in range(b1 - b0):
            for f in range(n_features):
                total = 0.0
                for k in range(mq):
                    total += acc[f, k, j]
                phi[b0 + j, f] += total


# ------------------------------------------------------- single-row TreeSHAP
# A single row has no row loop to vectorise: its walk runs over a "program", the
# tables above re-laid for one row at a time (`row_program`). Per record, an int32
# `ops` row and a float64 `rec` row at constant strides, per twig a `twig_rec` row;
# the quadrature nodes four at a time, each group of four with its own copy of
# `rec` and `twig_rec` (mq is a multiple of 4, see `forest._quadrature`).
OP_FEATURE, OP_LEVEL, OP_PREV_LEVEL, OP_IS_RIGHT, OP_N_UP, OP_TWIG = range(6)
N_OPS = 6
# rec: threshold (float32 value), ratio, leaf value, leaf score, then F1, F2, E1, E2 of four nodes
REC_THRESHOLD, REC_RATIO, REC_VALUE, REC_SCORE, REC_F1 = 0, 1, 2, 3, 4
REC_WIDTH = REC_F1 + 16
# twig_rec: threshold, left and right leaf scores, a pad, then A and B of cases 0, 1, 2 (four nodes each)
TWIG_THRESHOLD, TWIG_SCORE_LEFT, TWIG_A = 0, 1, 4
TWIG_B = TWIG_A + 12
TWIG_WIDTH = TWIG_B + 12


def row_program(tree_start, code, parent_threshold, leaf_value, ratio, terms,
                twig_code, twig_threshold, twig_a0, twig_a, twig_b, max_depth, leaf_score, twig_score):
    """The tables of `fuse_twigs` re-laid for `score_shap_rows`: (tree_start, ops,
    rec, twig_ops, twig_rec, path size, groups of four quadrature nodes), every
    array flat. A twig's case 0 is stored as A = a0 for every node and B = 0, so
    that the walk indexes the case instead of branching on it."""
    n, mq = code.shape[0], terms.shape[2]
    n_twigs = twig_code.shape[0]
    groups = mq // 4
    ops = np.empty((n, N_OPS), dtype=np.int32)
    ops[:, OP_FEATURE] = code[:, PARENT_FEATURE]
    ops[:, OP_LEVEL] = code[:, LEVEL]
    ops[:, OP_PREV_LEVEL] = code[:, PREV_LEVEL]
    ops[:, OP_IS_RIGHT] = code[:, IS_RIGHT]
    ops[:, OP_N_UP] = code[:, N_UP]
    ops[:, OP_TWIG] = code[:, TWIG]
    rec = np.zeros((groups, n, REC_WIDTH))
    twig_rec = np.zeros((groups, n_twigs, TWIG_WIDTH))
    for grp in range(groups):
        k = slice(4 * grp, 4 * grp + 4)
        rec[grp, :, REC_THRESHOLD] = parent_threshold
        rec[grp, :, REC_RATIO] = ratio
        rec[grp, :, REC_VALUE] = leaf_value
        rec[grp, :, REC_SCORE] = leaf_score
        for row in (F1, F2, E1, E2):
            rec[grp, :, REC_F1 + 4 * row:REC_F1 + 4 * row + 4] = terms[:, row, k]
        twig_rec[grp, :, TWIG_THRESHOLD] = twig_threshold
        twig_rec[grp, :, TWIG_SCORE_LEFT:TWIG_SCORE_LEFT + 2] = twig_score
        twig_rec[grp, :, TWIG_A:TWIG_A + 4] = twig_a0[:, None]
        for case in (1, 2):
            twig_rec[grp, :, TWIG_A + 4 * case:TWIG_A + 4 * case + 4] = twig_a[:, case - 1, k]
            twig_rec[grp, :, TWIG_B + 4 * case:TWIG_B + 4 * case + 4] = twig_b[:, case - 1, k]
    return (tree_start, ops.ravel(), rec.ravel(), np.ascontiguousarray(twig_code, dtype=np.int32).ravel(),
            twig_rec.ravel(), max_depth + 1, groups)


# contract: multiply-adds fused into FMAs (1.12-1.15x). The score stays exact: each
# of its additions is path_sum + score * 1.0 or + score * 0.0, rounded once either way.
@njit(cache=True, fastmath={"contract"})
def _walk_one_row(x, acc, tree_start, ops, rec, twig_ops, twig_rec, size, groups):
    """`_shap_rows` for one float64 row, adding to ``acc`` (flat n_features x mq);
    returns the row's path length summed over the trees, as `path_length_sums_serial`.

    The same walk, once per group of four quadrature nodes, the four in scalars.
    Written for the code LLVM makes of it (2-D tables and signed indices spent
    most of each step on stride multiplies, negative-index fix-ups and spills,
    and a select on the row's data compiled to a branch): flat arrays, constant
    strides, unsigned indices, and the edge state picked by arithmetic, not by
    branches: 1.45-1.75x the previous walk, the same numbers to the last bit
    (before the FMAs, which move the SHAP values by ~1e-14). Compiled with the
    SLP vectorizer (`compile_row_walk`), which packs each four lanes into one
    vector instruction where every load of the four comes before their stores.
    The walk passes the leaf the row reaches in every tree (the one below edges
    all in state 2), so it adds that leaf's score in tree order, the scoring
    kernel's sum to the last bit, instead of a second walk.
    """
    u = np.uint64
    one, two, three, four = u(1), u(2), u(3), u(4)
    n_trees = tree_start.shape[0] - 1
    n_records = u(tree_start[n_trees])
    n_twigs = u(twig_ops.shape[0] // 2)
    mq = u(4 * groups)
    q = np.ones(size * 4)
    g = np.zeros(size * 4)
    e_at = np.zeros(size * 4)  # the term of the edge above each level, in its state
    state = np.full(size, 2, dtype=np.int64)
    feature_at = np.zeros(size, dtype=np.uint64)
    reached = np.ones(size)  # 1.0 while every edge down to this level is followed
    path_sum = 0.0
    for grp in range(groups):
        k0 = u(4 * grp)
        rec0 = u(grp) * n_records * u(REC_WIDTH)
        twig0 = u(grp) * n_twigs * u(TWIG_WIDTH)
        first = 1.0 if grp == 0 else 0.0  # scores are added in the first group only
        for tr in range(n_trees):
            # a one-leaf tree's root scores; any other root's score is 0
            path_sum += rec[rec0 + u(tree_start[tr]) * u(REC_WIDTH) + u(REC_SCORE)] * first
            for ci in range(tree_start[tr] + 1, tree_start[tr + 1]):
                c = u(ci)
                o = c * u(N_OPS)
                f = u(ops[o + u(OP_FEATURE)])
                d = u(ops[o + u(OP_LEVEL)])
                n_up = ops[o + u(OP_N_UP)]
                b = rec0 + c * u(REC_WIDTH)
                follows = np.int64(x[f] <= rec[b + u(REC_THRESHOLD)]) ^ np.int64(ops[o + u(OP_IS_RIGHT)])
                s = np.int64(state[u(ops[o + u(OP_PREV_LEVEL)])] == 2) * (1 + follows)
                state[d] = s
                feature_at[d] = f
                # state 0: factor `ratio` and term 0; states 1 and 2: rows F1/E1 and F2/E2.
                # hot * a + cold * b with hot, cold in {0.0, 1.0} is exactly a or b.
                hot = 1.0 if s > 0 else 0.0
                cold_ratio = rec[b + u(REC_RATIO)] * (1.0 - hot)
                fi = b + u(REC_F1) + u(s == 2) * four
                ei = fi + u(8)
                dp = (d - one) * four
                q0 = q[dp] * (rec[fi] * hot + cold_ratio)
                q1 = q[dp + one] * (rec[fi + one] * hot + cold_ratio)
                q2 = q[dp + two] * (rec[fi + two] * hot + cold_ratio)
                q3 = q[dp + three] * (rec[fi + three] * hot + cold_ratio)
                e0 = rec[ei] * hot
                e1 = rec[ei + one] * hot
                e2 = rec[ei + two] * hot
                e3 = rec[ei + three] * hot
                here = reached[d - one] * (1.0 if s == 2 else 0.0)
                if n_up < 0:
                    dq = d * four
                    reached[d] = here
                    q[dq] = q0
                    q[dq + one] = q1
                    q[dq + two] = q2
                    q[dq + three] = q3
                    e_at[dq] = e0
                    e_at[dq + one] = e1
                    e_at[dq + two] = e2
                    e_at[dq + three] = e3
                    continue
                # a leaf: its G, its edge's term, then the edges of the subtrees it
                # ends. The leaf's own edge is the close step below with G kept in
                # registers: routing it through g[d] and the loop measured ~7% slower.
                tw = ops[o + u(OP_TWIG)]
                if tw < 0:
                    path_sum += rec[b + u(REC_SCORE)] * (here * first)
                    v = rec[b + u(REC_VALUE)]
                    q0 *= v
                    q1 *= v
                    q2 *= v
                    q3 *= v
                else:  # a folded twig, see `fuse_twigs`
                    t = u(tw)
                    ft = u(twig_ops[t * two])
                    tb = twig0 + t * u(TWIG_WIDTH)
                    goes_left = np.int64(x[ft] <= twig_rec[tb + u(TWIG_THRESHOLD)])
                    path_sum += twig_rec[tb + u(TWIG_SCORE_LEFT + 1) - u(goes_left)] * (here * first)
                    case = u(np.int64(state[u(twig_ops[t * two + one])] == 2) * (1 + goes_left))
                    ai = tb + u(TWIG_A) + case * four
                    bi = ai + u(TWIG_B - TWIG_A)
                    fa = ft * mq + k0
                    # every load of four before their stores: LLVM cannot tell `acc` and `g`
                    # from the tables, and packs the four into one vector only in this order
                    b0, b1, b2, b3 = twig_rec[bi], twig_rec[bi + one], twig_rec[bi + two], twig_rec[bi + three]
                    a0, a1, a2, a3 = acc[fa], acc[fa + one], acc[fa + two], acc[fa + three]
                    acc[fa] = a0 + q0 * b0
                    acc[fa + one] = a1 + q1 * b1
                    acc[fa + two] = a2 + q2 * b2
                    acc[fa + three] = a3 + q3 * b3
                    q0 *= twig_rec[ai]
                    q1 *= twig_rec[ai + one]
                    q2 *= twig_rec[ai + two]
                    q3 *= twig_rec[ai + three]
                fa = f * mq + k0
                a0, a1, a2, a3 = acc[fa], acc[fa + one], acc[fa + two], acc[fa + three]
                acc[fa] = a0 + q0 * e0
                acc[fa + one] = a1 + q1 * e1
                acc[fa + two] = a2 + q2 * e2
                acc[fa + three] = a3 + q3 * e3
                h0, h1, h2, h3 = g[dp], g[dp + one], g[dp + two], g[dp + three]
                g[dp] = h0 + q0
                g[dp + one] = h1 + q1
                g[dp + two] = h2 + q2
                g[dp + three] = h3 + q3
                lv = d - one
                for _ in range(n_up):
                    fu = feature_at[lv] * mq + k0
                    lp = lv * four
                    g0, g1, g2, g3 = g[lp], g[lp + one], g[lp + two], g[lp + three]
                    t0, t1, t2, t3 = e_at[lp], e_at[lp + one], e_at[lp + two], e_at[lp + three]
                    a0, a1, a2, a3 = acc[fu], acc[fu + one], acc[fu + two], acc[fu + three]
                    h0, h1, h2, h3 = g[lp - four], g[lp - three], g[lp - two], g[lp - one]
                    acc[fu] = a0 + g0 * t0
                    acc[fu + one] = a1 + g1 * t1
                    acc[fu + two] = a2 + g2 * t2
                    acc[fu + three] = a3 + g3 * t3
                    g[lp - four] = h0 + g0
                    g[lp - three] = h1 + g1
                    g[lp - two] = h2 + g2
                    g[lp - one] = h3 + g3
                    g[lp] = 0.0
                    g[lp + one] = 0.0
                    g[lp + two] = 0.0
                    g[lp + three] = 0.0
                    lv -= one
            g[:4] = 0.0
    return path_sum


@njit(cache=True)
def score_shap_rows(X, n_estimators, tree_start, ops, rec, twig_ops, twig_rec, size, groups):
    """Row by row on the calling thread, over a `row_program`: an (n, 1 + n_features)
    array of each row's path length summed over the trees, then its TreeSHAP
    values (the sums over the trees / n_estimators). X: float32 or float64 rows,
    read as float32; no rows at all when a value is NaN, infinite or beyond
    float32 (the caller's input check then names it)."""
    n, n_features = X.shape
    mq = 4 * groups
    x = np.empty((n, n_features))
    for i in range(n):
        for f in range(n_features):
            v = np.float32(X[i, f])  # float64: compares with the float32 thresholds as float32
            if not np.isfinite(v):
                return np.empty((0, 1 + n_features))
            x[i, f] = v
    out = np.empty((n, 1 + n_features))
    acc = np.empty(n_features * mq)
    for i in range(n):
        acc[:] = 0.0
        out[i, 0] = _walk_one_row(x[i], acc, tree_start, ops, rec, twig_ops, twig_rec, size, groups)
        for f in range(n_features):
            total = 0.0
            for k in range(mq):
                total += acc[f * mq + k]
            out[i, 1 + f] = total / n_estimators
    return out


def compile_row_walk(*args: object) -> None:
    """Compiles `score_shap_rows` for these arguments' types, or loads it from
    numba's cache, with LLVM's SLP vectorizer on.

    numba leaves the SLP vectorizer off, and then the walk's four quadrature
    lanes stay scalar; with it, Q and the edge terms move four at a time: the
    single-row walk 1.24-1.6x faster (median 1.36x, alternated in one process),
    the same numbers to the last bit. Only this kernel: the batch kernels,
    vectorised over rows already, gained nothing. Callers compile it here before
    the first call, so that no process compiles (and caches) it without.
    """
    signature = tuple(numba.typeof(a) for a in args)
    numba_config.reload_config()  # in step with the environment: a compilation inside keeps the flag
    saved = numba_config.SLP_VECTORIZE
    numba_config.SLP_VECTORIZE = 1
    try:
        score_shap_rows.compile(signature)
    finally:
        numba_config.SLP_VECTORIZE = saved


@njit(cache=True)
def shap_serial(X, tree_start, code, parent_threshold, leaf_value, ratio, terms,
                twig_code, twig_threshold, twig_a0, twig_a, twig_b, max_depth):
    """TreeSHAP sums of a batch of at least SHAP_VECTOR_ROWS rows on the calling thread."""
    phi = np.zeros((X.shape[0], X.shape[1]))
    _shap_rows(X, 0, X.shape[0], phi, tree_start, code, parent_threshold, leaf_value, ratio, terms,
               twig_code, twig_threshold, twig_a0, twig_a, twig_b, max_depth)
    return phi


@njit(cache=True, parallel=True)
def shap_parallel(X, n_chunks, tree_start, code, parent_threshold, leaf_value, ratio, terms,
                  twig_code, twig_threshold, twig_a0, twig_a, twig_b, max_depth):
    n = X.shape[0]
    phi = np.zeros((n, X.shape[1]))
    step = _whole_vectors((n + n_chunks - 1) // n_chunks)
    for ch in prange(n_chunks):
        start = ch * step
        stop = min(n, start + step)
        if start < stop:
            _shap_rows(X, start, stop, phi, tree_start, code, parent_threshold, leaf_value,
                       ratio, terms, twig_code, twig_threshold, twig_a0, twig_a, twig_b, max_depth)
    return phi
