"""Serving logic over one loaded model version plus everything that happened since it was trained.

The model version (``Bundle``) is immutable. What changes at run time lives in the event store
and is mirrored here: interactions recorded after training (so the next ``Recommend`` reflects
them), items upserted after training (recommendable at once through their text), and erased
users. ``catch_up()`` folds in whatever the store holds past this engine's positions, whichever
replica wrote it: the server runs it when the store's change feed says something was written (its
own writes included) and at load, so a freshly loaded version replays what it misses. Serving
never reads the store, so it goes on from memory while the store is down.

Thread safety: fold-in runs on worker threads, serving on the event loop. ``lock`` guards the
mutable serving state; the store is read outside it and each batch is applied under it.

Strategies:
- no history at all: market-aware popularity (COLD_START);
- a user the model never saw, with fewer than ``personalise_min_events`` items: similarity to
  the text of what they touched plus the market-popularity prior (CONTENT), when the catalogue
  has text;
- otherwise the serving model (PERSONALISED, or HYBRID for the blend). Vector models search the
  FAISS index with the user's vector (trained, or moved by the new events through fold-in) and
  filter the candidates, widening the search until ``k`` pass the filters; the others score the
  catalogue densely.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp

from services.runtime.state import StoreUnavailable

from .bundle import ALL_MARKETS, MAX_MARKETS, Bundle
from .data import EVENT_WEIGHTS, TYPE_NAMES, user_hash
from .events import Event, EventStore, StoredItem
from .models import VectorModel
from .models.hybrid import Hybrid
from .settings import RecommenderSettings

MARKET_RE = re.compile(r"^[A-Z]{2}$")
#: CLDR region codes that name no country (unknown, EU, eurozone, UN, outlying Oceania).
_NOT_COUNTRIES = frozenset({"ZZ", "EU", "EZ", "UN", "QO"})


@cache
def _countries() -> frozenset[str]:
    """ISO 3166-1 alpha-2 codes, from CLDR's territory names (babel) rather than a list kept here."""
    from babel import Locale

    codes = Locale("en").territories
    return frozenset(c for c in codes if len(c) == 2 and c.isalpha()) - _NOT_COUNTRIES


PERSONALISED, COLD_START, CONTENT, HYBRID = "personalised", "cold_start", "content", "hybrid"
_VECTOR_CACHE_MAX = 200_000
#: Weight of (0..1) market popularity beside content similarity for users with a little history:
#: with one or two items, "like what they touched" alone ranks far below plain popularity
#: (bench/recommender.py, cold start); the prior keeps the popular items among the similar ones.
COLD_POPULARITY_WEIGHT = 1.0


def content_profile(content: np.ndarray, hist: sp.csr_matrix) -> np.ndarray | None:
    """Unit-length, weight-averaged embedding of the items in ``hist`` (one user row)."""
    total = hist.data @ content[hist.indices] if hist.nnz else np.zeros(content.shape[1], np.float32)
    norm = float(np.linalg.norm(total))
    return (total / norm).astype(np.float32) if norm > 0 else None


def new_item_prior(
    popularity: np.ndarray, content: np.ndarray | None, new_emb: np.ndarray, k: int = 10
) -> np.ndarray:
    """Popularity prior of items nobody has touched yet: the upper quartile of the popularity of
    their ``k`` most similar catalogue items by text (0 without catalogue text). The catalogue's
    median buries new items; the neighbours' mean too (the long tail pulls it down); their max
    floods the lists. The upper quartile gives new items about their share of the top 50
    (bench/recommender.py, new_item_share_of_top_50, checked on a seed other than the bench's)."""
    if content is None or not len(new_emb) or not len(content):
        return np.zeros(len(new_emb), np.float32)
    k = min(k, len(content))
    sims = new_emb @ content.T
    near = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return np.quantile(popularity[near], 0.75, axis=1).astype(np.float32)


#: In the content path every FRESH_EVERY-th place after the first page goes to the item nobody has
#: touched yet (upserted since training, or without training interactions) that is most similar
#: to the user's profile: the popularity prior ranks such items below the popular ones, so without
#: these places a new item is almost never shown (bench/recommender.py, new_item_reach_at_50). The
#: first page (FRESH_EVERY places) stays ranked by merit, so NDCG@10 is untouched.
FRESH_EVERY = 10


def with_fresh_places(
    ranked: list[int], fresh_by_similarity: Sequence[int], k: int, every: int = FRESH_EVERY
) -> list[int]:
    """``ranked`` (best first, at least ``k`` long when it can be) cut to ``k``, where places
    ``2 * every``, ``3 * every``, ... (1-based) hold the next fresh items not already listed."""
    out = list(ranked[:k])
    listed = set(out)
    fresh = (c for c in fresh_by_similarity if c not in listed)
    for place in range(2 * every - 1, len(out), every):
        item = next(fresh, None)
        if item is None:
            break
        out.insert(place, item)
        listed.add(item)
    return out[:k]


def cold_content_scores(
    content: np.ndarray, q: np.ndarray, popularity: np.ndarray | None, weight: float = COLD_POPULARITY_WEIGHT
) -> np.ndarray:
    """The content path's scores: similarity to the profile ``q`` plus the popularity prior."""
    scores = content @ q
    if popularity is not None and weight:
        scores = scores + weight * popularity[: len(scores)]
    return scores.astype(np.float32)


FOLD_BATCH = 5000  # events read and applied per step of a catch-up
log = logging.getLogger("cbec.recommender.engine")


class UnknownFilter(ValueError):
    """A filter names a category or market the catalogue does not have (field, reason)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NoSignal(ValueError):
    """SimilarItems asked for a signal the item does not have (e.g. collaborative for a new item)."""


@dataclass
class Filters:
    category_codes: np.ndarray | None = None  # None: any category
    market_bit: int = 0  # 0: any market (else the market's bit)
    exclude: set[int] = field(default_factory=set)  # columns never returned

    @property
    def restrictive(self) -> bool:
        return self.category_codes is not None or bool(self.market_bit)


@dataclass
class ResultItem:
    item_id: str
    score: float
    title: str
    category: str
    explanation: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class _UserState:
    row: int
    base_idx: np.ndarray
    base_w: np.ndarray
    extra: dict[int, float]  # catalogue columns touched since training
    new: dict[int, float]  # upserted items touched
    n: int

    @property
    def touched(self) -> set[int]:
        return set(self.base_idx.tolist()) | set(self.extra) | set(self.new)

    @cached_property
    def base(self) -> sp.csr_matrix | None:
        if self.row < 0:
            return None
        return sp.csr_matrix(
            (self.base_w, self.base_idx, np.array([0, len(self.base_idx)])),
            shape=(1, self.n),
            dtype=np.float32,
        )

    @cached_property
    def hist(self) -> sp.csr_matrix:
        """Everything the user touched in the catalogue (training + new events), weights summed."""
        weights: dict[int, float] = dict(zip(self.base_idx.tolist(), self.base_w.tolist(), strict=True))
        for c, w in self.extra.items():
            weights[c] = weights.get(c, 0.0) + w
        cols = np.fromiter(sorted(weights), dtype=np.int32, count=len(weights))
        vals = np.array([weights[c] for c in cols.tolist()], dtype=np.float32)
        return sp.csr_matrix((vals, cols, np.array([0, len(cols)])), shape=(1, self.n), dtype=np.float32)


@dataclass
class _NewItems:
    """Items upserted after the model was trained: columns n_main + j."""

    ids: list[str] = field(default_factory=list)
    pos: dict[str, int] = field(default_factory=dict)
    titles: list[str] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)
    emb: np.ndarray = field(default_factory=lambda: np.zeros((0, 384), np.float32))


class Engine:
    def __init__(self, bundle: Bundle, store: EventStore, settings: RecommenderSettings) -> None:
        self.b = bundle
        self.store = store
        self.settings = settings
        cat = bundle.catalogue
        self.n_main = cat.n
        self.titles = cat.titles
        self.category_codes = cat.category_codes
        self.market_mask = cat.market_mask
        self.categories = list(cat.categories)
        self.cat_code = {c: i for i, c in enumerate(self.categories)}
        self.markets = list(cat.markets)
        self.market_bit = {m: np.uint64(1) << np.uint64(i) for i, m in enumerate(self.markets)}
        self.content = bundle.content
        self._user_loc = {str(u): i for i, u in enumerate(bundle.users.tolist())}
        self._items_index = pd.Index(cat.item_ids.astype(object))
        self.new = _NewItems(
            emb=np.zeros((0, bundle.content.shape[1] if bundle.content is not None else 384), np.float32)
        )
        self._owned: set[str] = set()  # arrays copied on first write
        # Read positions in the store's three logs: everything up to them is folded in here.
        self.applied_seq = bundle.events_seq
        self.items_seq = 0
        self.forgotten_seq = store.forgotten_seq  # erasures before it: their events are already gone
        self.lock = threading.RLock()  # serving state (below) vs fold-in threads
        self._fold_lock = threading.Lock()  # one catch-up at a time
        self._live_hash: dict[str, str] = {}  # user_hash -> id of users with live events
        self._bundle_hashes: tuple[np.ndarray, np.ndarray] | None = None  # (hash prefixes, rows)
        self.extra: dict[str, dict[int, float]] = {}
        self.user_market: dict[str, str] = {}
        self.vectors: dict[str, np.ndarray] = {}
        self.live_pop: dict[str, dict[int, float]] = defaultdict(dict)
        self._pop_order: dict[str, np.ndarray] = {}
        self._new_prior: dict[str, np.ndarray] = {}
        #: catalogue items without training interactions: fresh places in the content path
        self._untouched = np.diff(bundle.history.tocsc().indptr) == 0
        model = bundle.model
        self.vector_model = model if isinstance(model, VectorModel) else None
        self._item_matrix = self.vector_model.item_matrix() if self.vector_model is not None else None
        if self.vector_model is not None:
            self.vector_model._gram()  # fold-in's Y'Y, computed once at load rather than on a request
        self.strategy_name = HYBRID if isinstance(model, Hybrid) else PERSONALISED
        try:
            self.catch_up()
        except StoreUnavailable as exc:  # serve what the bundle knows; the change feed catches up later
            log.warning("store unavailable at load; folding in later", extra={"error": str(exc)[:200]})

    # --- catching up with the store ---------------------------------------------------------------
    def catch_up(self, until: int | None = None) -> int:
        """Fold in erasures, upserted items and interactions past this engine's positions, from any
        replica; returns how many events were applied. Each step reads erasures, then events, then
        items (an event's item was committed before it), and applies them in the order erasures,
        items, events. ``until``: nothing to do if events up to this seq are folded in already (a
        concurrent catch-up covered them). Raises StoreUnavailable when the store cannot be read."""
        applied = 0
        store = self.store
        with self._fold_lock:
            while until is None or self.applied_seq < until:
                # Seqs known committed before these reads: a read then sees every row up to them
                # (writers commit in seq order), so positions may pass rows an erasure deleted.
                events_known, items_known = store.last_seq, store.items_seq
                store.refresh_forgotten()
                hashes, forgotten_seq = store.forgotten_after(self.forgotten_seq)
                events = store.events_since(self.applied_seq, limit=FOLD_BATCH)
                fresh = store.items(since=self.items_seq)
                rows = self._bundle_rows(hashes) if hashes else {}
                done = len(events) < FOLD_BATCH
                with self.lock:
                    for h in hashes:
                        self._forget_hash(h, rows.get(h, -1))
                    self.forgotten_seq = max(self.forgotten_seq, forgotten_seq)
                    if fresh:
                        self._load_items(fresh)
                    self.items_seq = max(self.items_seq, items_known)
                    self.apply(events)
                    if done:
                        self.applied_seq = max(self.applied_seq, events_known)
                applied += len(events)
                if done:
                    break
        return applied

    def behind(self) -> bool:
        """Whether the store is known to hold writes this engine has not folded in (no I/O)."""
        store = self.store
        return (
            self.applied_seq < store.last_seq
            or self.items_seq < store.items_seq
            or self.forgotten_seq < store.forgotten_known
        )

    def sync(self) -> None:
        """Old name of ``catch_up``."""
        self.catch_up()

    def _own(self, name: str) -> None:
        if name not in self._owned:
            setattr(self, name, np.array(getattr(self, name), copy=True))
            self._owned.add(name)

    def _code_for(self, category: str) -> int:
        if not category:
            return -1
        if category not in self.cat_code:
            self.cat_code[category] = len(self.categories)
            self.categories.append(category)
        return self.cat_code[category]

    def _mask_for(self, markets: list[str]) -> int:
        if not markets:
            return int(ALL_MARKETS)
        value = 0
        for m in markets:
            if m not in self.market_bit:
                if len(self.markets) >= MAX_MARKETS:
                    raise ValueError(f"at most {MAX_MARKETS} markets are supported")
                self.market_bit[m] = np.uint64(1) << np.uint64(len(self.markets))
                self.markets.append(m)
            value |= int(self.market_bit[m])
        return value

    def _load_items(self, fresh: list[StoredItem]) -> None:
        """Apply upserted items: new ones become columns after the catalogue; known ones change."""
        self.items_seq = max([self.items_seq, *(s.seq for s in fresh)])
        added: list[np.ndarray] = []
        for stored in fresh:
            body = stored.body
            title = str(body.get("title", ""))
            code = self._code_for(str(body.get("category", "")))
            mask = self._mask_for([str(m) for m in body.get("markets", [])])  # type: ignore[union-attr]
            emb = stored.embedding
            main = self._item_loc(stored.item_id)
            if main >= 0:
                for name in ("titles", "category_codes", "market_mask"):
                    self._own(name)
                self.titles[main] = title
                self.category_codes[main] = code
                self.market_mask[main] = np.uint64(mask)
                if emb is not None and self.content is not None:
                    self._own("content")
                    self.content[main] = emb
                continue
            dim = self.new.emb.shape[1]
            vector = emb if emb is not None and len(emb) == dim else np.zeros(dim, np.float32)
            j = self.new.pos.get(stored.item_id)
            if j is None:
                self.new.pos[stored.item_id] = len(self.new.ids)
                self.new.ids.append(stored.item_id)
                self.new.titles.append(title)
                self.new.codes.append(code)
                self.new.masks.append(mask)
                added.append(vector)
            else:
                self.new.titles[j], self.new.codes[j], self.new.masks[j] = title, code, mask
                if j < len(self.new.emb):
                    self.new.emb[j] = vector
                else:
                    added[j - len(self.new.emb)] = vector
        if added:
            self.new.emb = np.vstack([self.new.emb, np.stack(added).astype(np.float32)])
        self._new_prior.clear()  # the new items' popularity priors (content path), recomputed lazily

    def col_of(self, item_id: str) -> int:
        """Column of an item (catalogue or upserted), -1 if unknown."""
        col = self._item_loc(item_id)
        if col >= 0:
            return col
        j = self.new.pos.get(item_id)
        return -1 if j is None else self.n_main + j

    def item_id_of(self, col: int) -> str:
        return str(self.b.catalogue.item_ids[col]) if col < self.n_main else self.new.ids[col - self.n_main]

    def apply(self, events: list[Event]) -> None:
        """Mirror stored events (already durable) into the serving state (under ``lock``)."""
        for e in events:
            if e.seq and e.seq <= self.applied_seq:
                continue
            self.applied_seq = max(self.applied_seq, e.seq)
            col = self.col_of(e.item_id)
            if col < 0:
                continue
            w = EVENT_WEIGHTS.get(TYPE_NAMES.get(e.type, "view"), 1.0)
            if e.user_id not in self.extra:  # so an erasure (known by hash only) finds the id
                self._live_hash[user_hash(e.user_id)] = e.user_id
            mine = self.extra.setdefault(e.user_id, {})
            mine[col] = mine.get(col, 0.0) + w
            if e.market:
                self.user_market[e.user_id] = e.market
            self.vectors.pop(e.user_id, None)
            glob = self.live_pop[""]
            glob[col] = glob.get(col, 0.0) + w
            if e.market:
                local = self.live_pop[e.market]
                local[col] = local.get(col, 0.0) + w

    def forget(self, user_id: str) -> None:
        """Drop the user's live state and trained vector (the store has deleted their events)."""
        with self.lock:
            self._forget_hash(user_hash(user_id), self._user_loc.get(user_id, -1), user_id)

    def _forget_hash(self, hashed: str, pos: int, user_id: str | None = None) -> None:
        """Drop the live state of the user with this hash (an erasure from the store's log) and zero
        their trained vector (``pos``: their training row, -1 if none)."""
        ids = {self._live_hash.pop(hashed, None), user_id}
        if pos >= 0:
            ids.add(str(self.b.users[pos]))
        for uid in ids - {None}:
            self.extra.pop(uid, None)  # type: ignore[arg-type]
            self.user_market.pop(uid, None)  # type: ignore[arg-type]
            self.vectors.pop(uid, None)  # type: ignore[arg-type]
        if pos >= 0:
            models = (
                list(self.b.model.components.values()) if isinstance(self.b.model, Hybrid) else [self.b.model]
            )
            for m in models:
                if isinstance(m, VectorModel) and m.user_factors is not None:
                    m.user_factors[pos] = 0.0

    def _bundle_rows(self, hashes: list[str]) -> dict[str, int]:
        """Training rows of the users with these hashes. The hash index over the training users is
        built on the first erasure this version sees (8-byte prefixes, sorted: 16 bytes a user)."""
        users = self.b.users
        if self._bundle_hashes is None:
            prefixes = np.fromiter(
                (int(user_hash(str(u))[:16], 16) for u in users.tolist()), dtype=np.uint64, count=len(users)
            )
            order = np.argsort(prefixes, kind="stable")
            self._bundle_hashes = (prefixes[order], order)
        prefixes, order = self._bundle_hashes
        out: dict[str, int] = {}
        for h in hashes:
            key = np.uint64(int(h[:16], 16))
            i = int(np.searchsorted(prefixes, key))
            while i < len(prefixes) and prefixes[i] == key:
                row = int(order[i])
                if user_hash(str(users[row])) == h:
                    out[h] = row
                    break
                i += 1
        return out

    # --- users -------------------------------------------------------------------------------------
    def user_row(self, user_id: str) -> int:
        pos = self._user_loc.get(user_id, -1)
        if pos >= 0 and self.store.is_forgotten(user_id):
            return -1
        return pos

    def _item_loc(self, item_id: str) -> int:
        try:
            loc = self._items_index.get_loc(item_id)
        except KeyError:
            return -1
        return int(loc) if isinstance(loc, int | np.integer) else -1

    def history(self, user_id: str) -> _UserState:
        """The user's training row (-1: unknown or erased), training items and what came since."""
        row = self.user_row(user_id)
        h = self.b.history
        if row >= 0:
            lo, hi = h.indptr[row], h.indptr[row + 1]
            base_idx, base_w = h.indices[lo:hi], h.data[lo:hi]
        else:
            base_idx, base_w = np.zeros(0, np.int32), np.zeros(0, np.float32)
        extra = self.extra.get(user_id, {})
        return _UserState(
            row=row,
            base_idx=base_idx,
            base_w=base_w,
            extra={c: w for c, w in extra.items() if c < self.n_main},
            new={c: w for c, w in extra.items() if c >= self.n_main},
            n=self.n_main,
        )

    # --- filters -----------------------------------------------------------------------------------
    def resolve_filters(
        self, market: str, categories: list[str], exclude_ids: list[str], category_field: str
    ) -> Filters:
        f = Filters()
        if market:
            if not MARKET_RE.match(market):
                raise UnknownFilter("market", "must be an ISO 3166-1 alpha-2 code such as DE")
            if market in self.market_bit:
                f.market_bit = int(self.market_bit[market])
            elif market not in _countries():
                raise UnknownFilter("market", "not an ISO 3166-1 alpha-2 country code")
            elif self.markets:
                # A market no item names: only items sold everywhere (all bits set) qualify, so ask for
                # a bit no market owns yet. With every bit taken, no free bit is left to ask for.
                if len(self.markets) >= MAX_MARKETS:
                    raise UnknownFilter("market", f"unknown market; known: {', '.join(self.markets)}")
                f.market_bit = int(np.uint64(1) << np.uint64(len(self.markets)))
        if categories:
            codes = []
            for i, c in enumerate(categories):
                if c not in self.cat_code:
                    shown = ", ".join(self.categories[:20]) + (" ..." if len(self.categories) > 20 else "")
                    raise UnknownFilter(f"{category_field}[{i}]", f"unknown category {c!r}; known: {shown}")
                codes.append(self.cat_code[c])
            f.category_codes = np.array(sorted(set(codes)), dtype=np.int32)
        for item_id in exclude_ids:
            col = self.col_of(item_id)
            if col >= 0:
                f.exclude.add(col)
        return f

    def _allowed(self, cols: np.ndarray, f: Filters) -> np.ndarray:
        cols = np.asarray(cols, dtype=np.int64)
        ok = np.ones(len(cols), dtype=bool)
        main = cols < self.n_main
        if f.category_codes is not None or f.market_bit:
            codes = np.empty(len(cols), np.int32)
            masks = np.empty(len(cols), np.uint64)
            codes[main] = self.category_codes[cols[main]]
            masks[main] = self.market_mask[cols[main]]
            if (~main).any():
                j = cols[~main] - self.n_main
                codes[~main] = np.asarray(self.new.codes, np.int32)[j]
                masks[~main] = np.asarray(self.new.masks, np.uint64)[j]
            if f.category_codes is not None:
                ok &= np.isin(codes, f.category_codes)
            if f.market_bit:
                ok &= (masks & np.uint64(f.market_bit)) != 0
        if f.exclude:
            excluded = f.exclude
            ok &= np.fromiter((c not in excluded for c in cols.tolist()), dtype=bool, count=len(cols))
        return ok

    def _full_mask(self, f: Filters) -> np.ndarray:
        """Boolean over the catalogue (not upserted items): which items pass ``f``."""
        ok = np.ones(self.n_main, dtype=bool)
        if f.category_codes is not None:
            ok &= np.isin(self.category_codes, f.category_codes)
        if f.market_bit:
            ok &= (self.market_mask & np.uint64(f.market_bit)) != 0
        if f.exclude:
            ex = np.fromiter((c for c in f.exclude if c < self.n_main), dtype=np.int64)
            ok[ex] = False
        return ok

    @staticmethod
    def _top(cols: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
        if len(cols) == 0:
            return []
        k = min(k, len(cols))
        part = np.argpartition(-scores, k - 1)[:k]
        part = part[np.argsort(-scores[part], kind="stable")]
        return [(int(cols[p]), float(scores[p])) for p in part]

    # --- recommend ---------------------------------------------------------------------------------
    def recommend(
        self,
        user_id: str,
        k: int,
        market: str,
        categories: list[str],
        exclude_ids: list[str],
        include_seen: bool,
        explain: bool,
    ) -> tuple[list[ResultItem], str]:
        with self.lock:
            return self._recommend(user_id, k, market, categories, exclude_ids, include_seen, explain)

    def _recommend(
        self,
        user_id: str,
        k: int,
        market: str,
        categories: list[str],
        exclude_ids: list[str],
        include_seen: bool,
        explain: bool,
    ) -> tuple[list[ResultItem], str]:
        f = self.resolve_filters(market, categories, exclude_ids, "filters.categories")
        st = self.history(user_id)
        touched = st.touched
        if not include_seen:
            f.exclude |= touched
        market = market or self.user_market.get(user_id, "")
        if not touched:
            return self._resolve(self._popular(market, k, f), None), COLD_START
        if st.row < 0 and len(touched) < self.settings.personalise_min_events and self._has_content():
            q = self._content_profile(st.hist, st.new)
            if q is not None:
                picked = self._content_search(q, k, f, market)
                explainer = self._content_explainer(st.hist, st.new) if explain else None
                return self._resolve(picked, explainer), CONTENT
        picked = self._personalised(user_id, st, k, f)
        explainer = None
        if explain:

            def explainer(col: int) -> list[tuple[int, float]]:
                if col >= self.n_main:
                    return self._content_explainer(st.hist, st.new)(col)
                return self.b.model.explain(st.hist, col, self.settings.explain_items)

        return self._resolve(picked, explainer), self.strategy_name

    def _resolve(self, picked: list[tuple[int, float]], explainer) -> list[ResultItem]:  # type: ignore[no-untyped-def]
        out = []
        for col, score in picked:
            if col < self.n_main:
                title, code = str(self.titles[col]), int(self.category_codes[col])
            else:
                j = col - self.n_main
                title, code = self.new.titles[j], self.new.codes[j]
            why = []
            if explainer is not None:
                why = [(self.item_id_of(c), w) for c, w in explainer(col)[: self.settings.explain_items]]
            category = self.categories[code] if code >= 0 else ""
            out.append(ResultItem(self.item_id_of(col), score, title, category, why))
        return out

    def _personalised(self, user_id: str, st: _UserState, k: int, f: Filters) -> list[tuple[int, float]]:
        users = np.array([st.row])
        if self.vector_model is not None:
            vec = self.vectors.get(user_id)
            if vec is None:
                if st.row >= 0 and not st.extra:
                    vec = np.asarray(self.vector_model.user_factors[st.row])  # type: ignore[index]
                else:
                    vec = self.vector_model.user_vectors(users, st.hist, st.base)[0]
                if len(self.vectors) > _VECTOR_CACHE_MAX:
                    self.vectors.clear()
                self.vectors[user_id] = vec
            query = self.vector_model.query_matrix(vec[None, :])[0]
            return self._vector_search(query, k, f)
        model = self.b.model
        if isinstance(model, Hybrid):
            parts = model.component_scores(users, st.hist, st.base)
            scores = model.blend(parts, model.weights)[0]
            extra = self._new_item_hybrid_scores(model, parts, st.hist, st.new)
        else:
            scores = model.score(users, st.hist, st.base)[0]
            extra = None
        return self._dense_top(scores, k, f, extra)

    def _dense_top(
        self, scores: np.ndarray, k: int, f: Filters, extra: tuple[np.ndarray, np.ndarray] | None = None
    ) -> list[tuple[int, float]]:
        ok = self._full_mask(f)
        cols = np.flatnonzero(ok)
        vals = np.asarray(scores, dtype=np.float32)[cols]
        if extra is not None and len(extra[0]):
            keep = self._allowed(extra[0], f)
            cols = np.concatenate([cols, extra[0][keep]])
            vals = np.concatenate([vals, extra[1][keep]])
        return self._top(cols, vals, k)

    def _vector_search(self, query: np.ndarray, k: int, f: Filters) -> list[tuple[int, float]]:
        index = self.b.index
        n = self.n_main
        fetch = int((k + len(f.exclude)) * (4 if f.restrictive else 1.5)) + 10
        while index is not None and fetch < n // 4:
            scores, ids = index.search(query[None, :], fetch)
            ids, scores = ids[0], scores[0]
            valid = ids >= 0
            ids, scores = ids[valid], scores[valid]
            ok = self._allowed(ids, f)
            if ok.sum() >= k or len(ids) < fetch:
                return self._top(ids[ok], scores[ok], k)
            fetch *= 4
        assert self._item_matrix is not None
        return self._dense_top(self._item_matrix @ query, k, f)

    # --- cold start --------------------------------------------------------------------------------
    def _popular(self, market: str, k: int, f: Filters) -> list[tuple[int, float]]:
        pop = self.b.popularity
        base = pop.for_market(market)
        key = market if market in pop.market_pop else ""
        order = self._pop_order.get(key)
        if order is None:
            order = np.argsort(-base, kind="stable")
            self._pop_order[key] = order
        live = dict(self.live_pop.get(market, {}))
        unit = 1.0 / max(pop.scale, 1e-9)
        head_size = k * 4 + 100 + len(f.exclude)
        while True:
            head = order[:head_size]
            live_cols = np.fromiter(live, dtype=np.int64) if live else np.zeros(0, np.int64)
            cols = np.unique(np.concatenate([head, live_cols]))
            scores = np.where(cols < self.n_main, base[np.minimum(cols, self.n_main - 1)], 0.0)
            if live:
                scores = scores + unit * np.array([live.get(int(c), 0.0) for c in cols])
            ok = self._allowed(cols, f)
            if ok.sum() >= k or head_size >= self.n_main:
                return self._top(cols[ok], scores[ok].astype(np.float32), k)
            head_size = min(self.n_main, head_size * 8)

    # --- content -----------------------------------------------------------------------------------
    def _has_content(self) -> bool:
        return self.content is not None or len(self.new.ids) > 0

    def _content_profile(self, hist: sp.csr_matrix, new: dict[int, float]) -> np.ndarray | None:
        dim = self.new.emb.shape[1]
        total = np.zeros(dim, np.float32)
        if self.content is not None and hist.nnz:
            total += hist.data @ self.content[hist.indices]
        for col, w in new.items():
            total += w * self.new.emb[col - self.n_main]
        norm = float(np.linalg.norm(total))
        return total / norm if norm > 0 else None

    def _content_search(self, q: np.ndarray, k: int, f: Filters, market: str = "") -> list[tuple[int, float]]:
        """Content similarity plus the market-popularity prior (``cold_content_scores``)."""
        cols_list, vals_list = [], []
        pop = self.b.popularity.for_market(market)
        if self.content is not None:
            ok = self._full_mask(f)
            cols = np.flatnonzero(ok)
            cols_list.append(cols)
            vals_list.append(cold_content_scores(self.content[cols], q, pop[cols]))
        if self.new.ids:
            cols = self.n_main + np.arange(len(self.new.ids))
            keep = self._allowed(cols, f)
            cols_list.append(cols[keep])
            prior = self._new_prior.get(market)
            if prior is None or len(prior) != len(self.new.ids):
                prior = self._new_prior[market] = new_item_prior(pop, self.content, self.new.emb)
            vals_list.append(cold_content_scores(self.new.emb[keep], q, prior[keep]))
        if not cols_list:
            return []
        cols, vals = np.concatenate(cols_list), np.concatenate(vals_list).astype(np.float32)
        top = self._top(cols, vals, k)
        if k < 2 * FRESH_EVERY:
            return top
        fresh = cols >= self.n_main
        fresh[~fresh] = self._untouched[cols[~fresh]]
        if not fresh.any():
            return top
        fresh_cols = cols[fresh]
        main = fresh_cols[fresh_cols < self.n_main]
        parts = [self.content[main]] if len(main) and self.content is not None else []
        if len(main) < len(fresh_cols):
            parts.append(self.new.emb[fresh_cols[len(main) :] - self.n_main])
        order = fresh_cols[np.argsort(-(np.vstack(parts) @ q), kind="stable")][: k // FRESH_EVERY]
        placed = with_fresh_places([c for c, _ in top], [int(c) for c in order], k)
        score = dict(top) | dict(zip(fresh_cols.tolist(), vals[fresh].tolist(), strict=True))
        return [(c, score[c]) for c in placed]

    def _embedding(self, col: int) -> np.ndarray | None:
        if col >= self.n_main:
            v = self.new.emb[col - self.n_main]
        elif self.content is not None:
            v = self.content[col]
        else:
            return None
        return v if np.any(v) else None

    def _content_explainer(self, hist: sp.csr_matrix, new: dict[int, float]):  # type: ignore[no-untyped-def]
        past = [(int(c), float(w)) for c, w in zip(hist.indices, hist.data, strict=True)] + list(new.items())

        def explain(col: int) -> list[tuple[int, float]]:
            target = self._embedding(col)
            if target is None:
                return []
            out = []
            for c, w in past:
                e = self._embedding(c)
                if e is not None:
                    out.append((c, w * float(e @ target)))
            out.sort(key=lambda cw: -cw[1])
            return [cw for cw in out if cw[1] > 0]

        return explain

    def _new_item_hybrid_scores(
        self, model: Hybrid, parts: dict[str, np.ndarray], hist: sp.csr_matrix, new: dict[int, float]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Upserted items in the blend: their content z-score (other signals count as average, 0)."""
        if not self.new.ids or "content" not in parts:
            return None
        q = self._content_profile(hist, new)
        if q is None:
            return None
        main = parts["content"][0]
        std = float(main.std()) or 1.0
        z = (self.new.emb @ q - float(main.mean())) / std
        cols = self.n_main + np.arange(len(self.new.ids))
        return cols, (model.weights.get("content", 0.0) * z).astype(np.float32)

    # --- similar items -----------------------------------------------------------------------------
    def similar(
        self, item_id: str, k: int, market: str, categories: list[str], source: str
    ) -> list[ResultItem] | None:
        """``source``: collaborative | content | blended. None when the item is unknown."""
        with self.lock:
            return self._similar(item_id, k, market, categories, source)

    def _similar(
        self, item_id: str, k: int, market: str, categories: list[str], source: str
    ) -> list[ResultItem] | None:
        col = self.col_of(item_id)
        if col < 0:
            return None
        f = self.resolve_filters(market, categories, [], "categories")
        f.exclude.add(col)
        collab = self.b.collaborative_vectors() if col < self.n_main else None
        ease = self.b.ease_matrix() if (collab is None and col < self.n_main) else None
        has_collab = (collab is not None and np.any(collab[col])) or ease is not None
        if has_collab and self.b.history[:, col].nnz == 0:
            has_collab = False  # never interacted with in training: no collaborative signal
        content_vec = self._embedding(col)
        use_collab = has_collab and source in ("collaborative", "blended")
        use_content = content_vec is not None and source in ("content", "blended")
        if source == "collaborative" and not has_collab:
            raise NoSignal("the item has no interactions in the model yet; ask for content similarity")
        if source == "content" and content_vec is None:
            raise NoSignal("the item has no text embedding; ask for collaborative similarity")
        if not (use_collab or use_content):
            raise NoSignal("the item has neither interactions nor text to compare")
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        if use_collab:
            if collab is not None:
                sims = collab @ collab[col]
            else:
                both = ease[col] + ease[:, col].T  # type: ignore[index]
                sims = np.asarray(both.todense() if sp.issparse(both) else both, dtype=np.float32).ravel()
                top = float(np.abs(sims).max()) or 1.0
                sims = sims / top
            parts.append((np.arange(self.n_main), sims.astype(np.float32)))
        if use_content:
            cols_list, vals_list = [], []
            if self.content is not None:
                cols_list.append(np.arange(self.n_main))
                vals_list.append(self.content @ content_vec)
            if self.new.ids:
                cols_list.append(self.n_main + np.arange(len(self.new.ids)))
                vals_list.append(self.new.emb @ content_vec)
            parts.append((np.concatenate(cols_list), np.concatenate(vals_list).astype(np.float32)))
        total = np.zeros(self.n_main + len(self.new.ids), np.float32)
        for cols, vals in parts:
            total[cols] += vals / len(parts)
        cols = np.arange(len(total))
        keep = self._allowed(cols, f)
        picked = self._top(cols[keep], total[keep], k)
        return self._resolve(picked, None)
