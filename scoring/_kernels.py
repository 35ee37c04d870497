"""numba kernels behind `CompiledForest`: no input checks here, callers validate.

Layout: all trees are concatenated into flat per-node arrays; `roots[t]` is the
index of tree t's root; children indices are global; `feature[n] == -1` marks a
leaf. Inputs `X` are float32 (as scikit-learn's trees see them) and are compared
to the float64 thresholds after widening, exactly as `sklearn.tree` does.

TreeSHAP (path-dependent, Lundberg et al. 2018) is evaluated per leaf through
its closed form: for a leaf with value v and unique path features P, each with
zero fraction z_j (product of cover ratios of its edges) and one fraction o_j
(1 if x follows all its edges, else 0),

    phi_i += v (o_i - z_i) * integral_0^1 prod_{j in P, j != i} (o_j t + z_j (1 - t)) dt

(the Shapley weight |S|!(d-|S|-1)!/d! is the Beta integral of t^|S| (1-t)^(d-|S|-1)).
The integrand is a polynomial of degree < max depth, so an m-point Gauss-Legendre
rule with 2m >= max depth is exact. With Q(t) = prod_{j in P} q_j(t) and
q_j(t) = o_j t + z_j (1 - t) the contribution is v * sum_k w_k Q(t_k) r_i(t_k)
where r_i = (o_i - z_i) / q_i(t_k): -1/(1-t_k) for a cold feature and a
precomputed, x-independent array for a hot one. The per-edge factors updating
Q are precomputed too (`prepare_edges`), so the per-row loop has no division.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def prepare_edges(feature, left, right, cover, n_nodes, t):
    """Per-node (as a child) x-independent factors of the TreeSHAP recurrence.

    Returns (fac_hot, fac_cold, r_hot, edge_ratio), each row indexed by the child
    node: multiply Q by fac_hot/fac_cold when the feature's previous one fraction
    is 1 (or this is its first edge on the path), by edge_ratio when it is 0.
    """
    m = t.shape[0]
    parent = -np.ones(n_nodes, dtype=np.int64)
    for n in range(n_nodes):
        if feature[n] >= 0:
            parent[left[n]] = n
            parent[right[n]] = n
    fac_hot = np.ones((n_nodes, m))
    fac_cold = np.ones((n_nodes, m))
    r_hot = np.zeros((n_nodes, m))
    edge_ratio = np.ones(n_nodes)
    for c in range(n_nodes):
        p = parent[c]
        if p < 0:
            continue
        f = feature[p]
        ratio = cover[c] / cover[p]
        # zero fraction of f before this edge: product over earlier edges on f
        z_prev = 1.0
        b = p
        a = parent[b]
        while a >= 0:
            if feature[a] == f:
                z_prev *= cover[b] / cover[a]
            b = a
            a = parent[b]
        z_new = z_prev * ratio
        edge_ratio[c] = ratio
        for k in range(m):
            q1_prev = t[k] + z_prev * (1.0 - t[k])
            q1_new = t[k] + z_new * (1.0 - t[k])
            fac_hot[c, k] = q1_new / q1_prev
            fac_cold[c, k] = z_new * (1.0 - t[k]) / q1_prev
            r_hot[c, k] = (1.0 - z_new) / q1_new
    return fac_hot, fac_cold, r_hot, edge_ratio


ROW_BLOCK = 256  # rows scored together, tree by tree, so that a tree stays in cache


@njit(cache=True)
def _path_sums_block(X, start, stop, out, roots, feature, threshold, left, right, value):
    for i in range(start, stop):
        out[i] = 0.0
    for ti in range(roots.shape[0]):
        root = roots[ti]
        for i in range(start, stop):
            n = root
            while feature[n] >= 0:
                if np.float64(X[i, feature[n]]) <= threshold[n]:
                    n = left[n]
                else:
                    n = right[n]
            out[i] += value[n]


@njit(cache=True)
def path_length_sums_serial(X, roots, feature, threshold, left, right, value):
    """Sum over trees of the path length (depth + c(leaf size)) of each row."""
    out = np.empty(X.shape[0])
    for start in range(0, X.shape[0], ROW_BLOCK):
        _path_sums_block(X, start, min(X.shape[0], start + ROW_BLOCK), out,
                         roots, feature, threshold, left, right, value)
    return out


@njit(cache=True, parallel=True)
def path_length_sums_parallel(X, roots, feature, threshold, left, right, value):
    n = X.shape[0]
    out = np.empty(n)
    n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(n_blocks):
        start = b * ROW_BLOCK
        _path_sums_block(X, start, min(n, start + ROW_BLOCK), out,
                         roots, feature, threshold, left, right, value)
    return out


@njit(cache=True)
def _shap_rows(X, start, stop, phi, roots, feature, threshold, left, right, value,
               fac_hot, fac_cold, r_hot, edge_ratio, r_cold, w, max_depth):
    """Adds the summed (not yet averaged) TreeSHAP values of rows start..stop to phi."""
    m = w.shape[0]
    n_features = X.shape[1]
    size = max_depth + 2
    q = np.ones((size, m))
    u = np.empty(m)
    path_f = np.zeros(size, dtype=np.int64)
    path_node = np.zeros(size, dtype=np.int64)
    path_hot = np.zeros(size, dtype=np.bool_)
    saved_last = np.zeros(size, dtype=np.int64)
    last_lvl = np.zeros(n_features, dtype=np.int64)  # 0 = feature not on the path
    stack_node = np.zeros(2 * size, dtype=np.int64)
    stack_depth = np.zeros(2 * size, dtype=np.int64)
    stack_hot = np.zeros(2 * size, dtype=np.bool_)
    for ti in range(roots.shape[0]):  # tree-major: a tree's arrays stay in cache
        for i in range(start, stop):
            x = X[i]
            top = 1
            stack_node[0] = roots[ti]
            stack_depth[0] = 0
            cur = 0
            while top > 0:
                top -= 1
                c = stack_node[top]
                d = stack_depth[top]
                # undo path levels d.. (a sibling subtree was finished)
                while cur >= d and cur > 0:
                    last_lvl[path_f[cur]] = saved_last[cur]
                    cur -= 1
                if d > 0:
                    f = feature[path_node[d - 1]]  # the parent is still on the path
                    prev = last_lvl[f]
                    saved_last[d] = prev
                    path_f[d] = f
                    path_node[d] = c
                    if prev == 0 or path_hot[prev]:
                        if stack_hot[top]:
                            for k in range(m):
                                q[d, k] = q[d - 1, k] * fac_hot[c, k]
                            path_hot[d] = True
                        else:
                            for k in range(m):
                                q[d, k] = q[d - 1, k] * fac_cold[c, k]
                            path_hot[d] = False
                    else:
                        er = edge_ratio[c]
                        for k in range(m):
                            q[d, k] = q[d - 1, k] * er
                        path_hot[d] = False
                    last_lvl[f] = d
                    cur = d
                else:
                    path_node[0] = c
                fc = feature[c]
                if fc < 0:
                    if d == 0:
                        continue
                    v = value[c]
                    s_cold = 0.0
                    for k in range(m):
                        u[k] = v * w[k] * q[d, k]
                        s_cold += u[k] * r_cold[k]
                    for lvl in range(1, d + 1):
                        f = path_f[lvl]
                        if last_lvl[f] == lvl:
                            if path_hot[lvl]:
                                node = path_node[lvl]
                                s = 0.0
                                for k in range(m):
                                    s += u[k] * r_hot[node, k]
                                phi[i, f] += s
                            else:
                                phi[i, f] += s_cold
                else:
                    go_left = np.float64(x[fc]) <= threshold[c]
                    stack_node[top] = right[c]
                    stack_depth[top] = d + 1
                    stack_hot[top] = not go_left
                    top += 1
                    stack_node[top] = left[c]
                    stack_depth[top] = d + 1
                    stack_hot[top] = go_left
                    top += 1
            while cur > 0:
                last_lvl[path_f[cur]] = saved_last[cur]
                cur -= 1


@njit(cache=True)
def shap_serial(X, roots, feature, threshold, left, right, value,
                fac_hot, fac_cold, r_hot, edge_ratio, r_cold, w, max_depth):
    phi = np.zeros((X.shape[0], X.shape[1]))
    _shap_rows(X, 0, X.shape[0], phi, roots, feature, threshold, left, right, value,
               fac_hot, fac_cold, r_hot, edge_ratio, r_cold, w, max_depth)
    return phi


@njit(cache=True, parallel=True)
def shap_parallel(X, n_chunks, roots, feature, threshold, left, right, value,
                  fac_hot, fac_cold, r_hot, edge_ratio, r_cold, w, max_depth):
    n = X.shape[0]
    phi = np.zeros((n, X.shape[1]))
    step = (n + n_chunks - 1) // n_chunks
    for ch in prange(n_chunks):
        start = ch * step
        stop = min(n, start + step)
        if start < stop:
            _shap_rows(X, start, stop, phi, roots, feature, threshold, left, right, value,
                       fac_hot, fac_cold, r_hot, edge_ratio, r_cold, w, max_depth)
    return phi
