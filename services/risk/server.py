"""``cbec.risk.v1.RiskService`` on the shared runtime: validation, scoring, outcomes, rates freshness.

One transaction goes through the runtime's micro-batcher (calls that arrive together share one
LightGBM call and one unit of state work); a batch call runs directly in a worker thread. Velocity
state is read and written under the state store's lock, in arrival order, and committed before the
answer leaves, so a killed process never forgets a transaction it has answered for. The store is the
runtime's (``state.py``): embedded SQLite under ``CBEC_STATE_DIR``, or PostgreSQL + Redis shared by
every replica; a store that is down makes calls that need it UNAVAILABLE with RetryInfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from cbec.common.v1 import common_pb2
from cbec.risk.v1 import risk_pb2, risk_pb2_grpc
from prometheus_client import Counter, Gauge, Histogram

from services.runtime.admin import model_info
from services.runtime.errors import InvalidArgument, Violation, quote, raise_if
from services.runtime.model_store import Loaded, Manifest, ModelSlot
from services.runtime.money import to_money
from services.runtime.server import Runtime

from .config import RiskSettings
from .features import (
    DAY_MS,
    FeaturePipeline,
    RatesTable,
    Tx,
    countries,
    timestamp_ms,
    transaction_amount,
    tx_from_proto,
    valid_timezone,
)
from .model import DECISION_NAMES, RiskModel, load_model, reasons_for_batch
from .state import LEGACY_FILE, STORE, ScoredRow, StateStore

log = logging.getLogger("cbec.risk")
SERVICE_NAME = risk_pb2.DESCRIPTOR.services_by_name["RiskService"].full_name
# Health name that reports the currency-rates table: NOT_SERVING while it is older than its maximum age.
RATES_HEALTH = f"{SERVICE_NAME}.rates"
MAX_AMOUNT = 1e12
OLDEST_MS = 946_684_800_000  # 2000-01-01: anything older is a unit mistake, not a transaction


# --- validation -----------------------------------------------------------------------------------------
def validate_transaction(
    t: risk_pb2.Transaction, prefix: str, rates: RatesTable, now_s: float, max_future_s: float
) -> list[Violation]:
    """Every problem with one transaction, as field violations (paths start with ``prefix``). The
    REQUIRED fields (transaction_id, card_fingerprint, occurred_time), lengths, control characters,
    the timestamps' range and the form of ``total`` are the contract's (``risk.proto``), checked by
    the runtime before this runs. ``user_id`` is required here, not in the contract: through the
    gateway, credentials bound to a user fill it in."""
    out: list[Violation] = []

    def bad(name: str, description: str) -> None:
        out.append(Violation(prefix + name, description))

    if not t.user_id.strip():
        bad("user_id", "is required")
    amount, disagreements = transaction_amount(t, prefix)
    out.extend(disagreements)
    if amount is None:
        bad("total", "is required (or, until v2, the deprecated amount and currency)")
    else:
        value = amount.value
        if value.is_nan():
            out.append(Violation(amount.value_path, "must be a number, not NaN"))
        elif not value.is_finite() or value > MAX_AMOUNT:
            out.append(Violation(amount.value_path, f"must be at most {MAX_AMOUNT:g}"))
        elif value <= 0:
            out.append(Violation(amount.value_path, "must be greater than 0"))
        if not amount.currency:
            out.append(Violation(amount.currency_path, "is required (ISO 4217 code)"))
        elif amount.currency.upper() not in rates:
            out.append(
                Violation(
                    amount.currency_path,
                    f"unknown currency {quote(amount.currency)}: not in rates table {rates.version}",
                )
            )
    table = countries()
    for name in ("ip_country", "billing_country", "shipping_country"):
        code = getattr(t, name).strip().upper()
        if code and code not in table:
            bad(name, f"unknown country code {quote(getattr(t, name))} (ISO 3166-1 alpha-2 expected)")
    occurred_ms: int | None = None
    if t.HasField("occurred_time"):  # required: the runtime, by the contract
        occurred_ms = timestamp_ms(t.occurred_time)
        if occurred_ms > (now_s + max_future_s) * 1000:
            bad("occurred_time", f"is in the future (more than {max_future_s:g} s ahead of the server clock)")
        elif occurred_ms < OLDEST_MS:
            bad("occurred_time", "is before 2000-01-01")
    if t.HasField("account_created_time"):
        created_ms = timestamp_ms(t.account_created_time)
        if occurred_ms is not None and created_ms > occurred_ms:
            bad("account_created_time", "is after occurred_time")
        elif created_ms > (now_s + max_future_s) * 1000:
            bad("account_created_time", "is in the future")
    if t.buyer_timezone.strip() and not valid_timezone(t.buyer_timezone.strip()):
        bad("buyer_timezone", f"unknown IANA time zone {quote(t.buyer_timezone)}")
    return out


# --- metrics ------------------------------------------------------------------------------------------------
class RiskMetrics:
    """Risk-specific series on the server's registry (``risk_*``)."""

    def __init__(self, runtime: Runtime, service: RiskService) -> None:
        r = runtime.metrics.registry
        self.rates_age = Gauge(
            "risk_rates_age_seconds", "Age of the currency rates table (from its date).", registry=r
        )
        self.rates_age.set_function(lambda: service.rates.age_seconds())
        self.rates_stale = Gauge(
            "risk_rates_stale",
            "1 when the rates table is older than CBEC_RISK_RATES_MAX_AGE_DAYS.",
            registry=r,
        )
        self.rates_stale.set_function(lambda: float(service.rates_stale()))
        self.rates_info = Gauge(
            "risk_rates_info", "1 for the rates table in use.", ("version", "as_of"), registry=r
        )
        self.decisions = Counter("risk_decisions", "Assessments by decision.", ("decision",), registry=r)
        self.outcomes = Counter("risk_outcomes", "Outcome labels received.", ("outcome",), registry=r)
        self.probability = Histogram(
            "risk_fraud_probability",
            "Fraud probabilities returned (watch for drift).",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99),
            registry=r,
        )
        self._decision = {code: self.decisions.labels(name) for code, name in DECISION_NAMES.items()}

    def set_rates(self, rates: RatesTable) -> None:
        self.rates_info.clear()
        self.rates_info.labels(rates.version, rates.as_of.isoformat()).set(1)

    def observe(self, probabilities: Sequence[float], decisions: Sequence[int]) -> None:
        for p, d in zip(probabilities, decisions, strict=True):
            self.probability.observe(p)
            self._decision[int(d)].inc()


@dataclass(frozen=True)
class _Tables:
    """The rates table and the pipeline built on it, swapped together when the file changes."""

    rates: RatesTable
    pipeline: FeaturePipeline
    mtime: float


# --- the service ------------------------------------------------------------------------------------------
class RiskService(risk_pb2_grpc.RiskServiceServicer):
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        settings = runtime.settings
        if not isinstance(settings, RiskSettings):  # a plain RuntimeSettings (tests, other launchers)
            settings = RiskSettings(**settings.model_dump())
        self.settings = settings
        self._tables = self._load_tables()
        # A store that is down at start does not stop the process: calls that need it are UNAVAILABLE
        # and health reports it until it answers (the migrations then run on first use).
        self.redis = runtime.redis() if runtime.state.shared else None
        self.state = StateStore(
            runtime.database(STORE, synchronous=settings.risk_state_synchronous),
            self.redis,
            event_retention_ms=int(settings.risk_event_retention_days * DAY_MS),
            scored_retention_ms=int(settings.risk_scored_retention_days * DAY_MS),
            synchronous=settings.risk_state_synchronous,
        )
        if not runtime.state.shared:
            self.state.import_legacy(settings.state_dir / LEGACY_FILE)
        threads = settings.risk_predict_threads
        self.slot: ModelSlot[RiskModel] = runtime.model_slot(
            lambda path, manifest: load_model(path, manifest, predict_threads=threads)
        )
        self.batcher = runtime.batcher(self._score_items, "risk")
        self.metrics = RiskMetrics(runtime, self)
        self.metrics.set_rates(self.rates)
        self._infos: dict[str, common_pb2.ModelInfo] = {}
        self._infos_lock = threading.Lock()
        self._rates_task: asyncio.Task[None] | None = None
        self._warned_stale = False

    # --- lifecycle ---
    async def start(self) -> None:
        await self._check_rates_age()
        self._rates_task = asyncio.get_running_loop().create_task(self._watch_rates(), name="risk-rates")

    async def stop(self) -> None:
        if self._rates_task is not None:
            self._rates_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rates_task
        self.state.close()  # the runtime closes the database and the Redis client it opened

    def register(self, server: grpc.aio.Server) -> None:
        risk_pb2_grpc.add_RiskServiceServicer_to_server(self, server)

    # --- rates ---
    @property
    def rates(self) -> RatesTable:
        return self._tables.rates

    def _load_tables(self) -> _Tables:
        path = self.settings.risk_rates_path
        rates = RatesTable.load(path)
        return _Tables(rates, FeaturePipeline(rates), path.stat().st_mtime)

    def rates_stale(self) -> bool:
        return self.rates.age_seconds() > self.settings.risk_rates_max_age_days * 86_400

    async def _check_rates_age(self) -> None:
        """Stale rates keep serving (a checkout must not stop), but health says so under its own name."""
        stale = self.rates_stale()
        await self.runtime.set_health(RATES_HEALTH, not stale)
        if stale and not self._warned_stale:
            log.warning(
                "currency rates table %s (as of %s) is %.1f days old, older than the %.1f-day maximum; "
                "still serving with it (metric risk_rates_stale=1)",
                self.rates.version,
                self.rates.as_of,
                self.rates.age_seconds() / 86_400,
                self.settings.risk_rates_max_age_days,
            )
        self._warned_stale = stale

    async def _watch_rates(self) -> None:
        """Re-read the rates file when it changes; re-check its age (a table goes stale with time)."""
        while True:
            await asyncio.sleep(self.settings.risk_rates_check_s)
            try:
                mtime = self.settings.risk_rates_path.stat().st_mtime
                if mtime != self._tables.mtime:
                    tables = await asyncio.to_thread(self._load_tables)
                    self._tables = tables
                    self.metrics.set_rates(tables.rates)
                    log.info("loaded currency rates %s (as of %s)", tables.rates.version, tables.rates.as_of)
            except (OSError, ValueError, KeyError) as exc:
                log.error(
                    "rates file %s not reloaded, keeping %s: %s",
                    self.settings.risk_rates_path,
                    self.rates.version,
                    exc,
                )
            await self._check_rates_age()

    # --- scoring (worker threads) ---
    def _info(self, manifest: Manifest) -> common_pb2.ModelInfo:
        info = self._infos.get(manifest.version)
        if info is None:
            with self._infos_lock:
                info = self._infos.setdefault(manifest.version, model_info(manifest))
        return info

    def assess(self, txs: Sequence[Tx]) -> list[risk_pb2.RiskAssessment]:
        """Score transactions in order: features and velocity state (committed), model, decision,
        reasons; the scored transactions are logged for the next training run."""
        loaded: Loaded[RiskModel] = self.slot.require()
        model, tables, s = loaded.model, self._tables, self.settings
        policy = model.policy.with_overrides(
            s.risk_review_threshold, s.risk_decline_threshold, s.risk_anomaly_threshold
        )
        # One unit of state work per call: history read (shared: one Redis round trip for all of the
        # call's transactions), events and the scored log written and committed before the answer leaves.
        with self.state.batch():
            self.state.prefetch(txs)
            x, amounts = tables.pipeline.transform(txs, self.state)
            scores = model.score(x)
            decisions = policy.decide(scores.probability, scores.anomaly)
            version = loaded.manifest.version
            self.state.record_scored(
                [
                    ScoredRow(tx, float(p), float(a), int(d), version)
                    for tx, p, a, d in zip(txs, scores.probability, scores.anomaly, decisions, strict=True)
                ]
            )
        info = self._info(loaded.manifest)
        reference, rates_version = tables.rates.reference, tables.rates.version
        reasons = reasons_for_batch(
            x, scores.contributions, txs, s.risk_reasons, scores.anomaly, policy.anomaly
        )
        out = []
        for i, tx in enumerate(txs):
            out.append(
                risk_pb2.RiskAssessment(
                    transaction_id=tx.transaction_id,
                    fraud_probability=float(scores.probability[i]),
                    anomaly_score=float(scores.anomaly[i]),
                    decision=int(decisions[i]),
                    reasons=[
                        risk_pb2.Reason(
                            code=r.code,
                            description=r.description,
                            contribution=r.contribution,
                            feature=r.feature,
                            value=r.value,
                        )
                        for r in reasons[i]
                    ],
                    amount_reference=float(amounts[i]),
                    reference_currency=reference,
                    rates_version=rates_version,
                    model=info,
                    reference_total=to_money(float(amounts[i]), reference),
                )
            )
        self.metrics.observe(scores.probability.tolist(), decisions.tolist())
        return out

    def _score_items(self, txs: list[Tx]) -> list[risk_pb2.RiskAssessment]:
        return self.assess(txs)

    def _checked(self, transactions: Sequence[risk_pb2.Transaction], prefix: str) -> list[Tx]:
        """Validate every transaction (all violations at once) and convert them."""
        now_s, rates, max_future = time.time(), self.rates, self.settings.risk_max_future_s
        violations: list[Violation] = []
        seen: dict[str, int] = {}
        for i, t in enumerate(transactions):
            path = prefix.format(i=i)
            violations.extend(validate_transaction(t, path, rates, now_s, max_future))
            if t.transaction_id in seen and t.transaction_id:
                violations.append(
                    Violation(f"{path}transaction_id", f"duplicates transactions[{seen[t.transaction_id]}]")
                )
            seen.setdefault(t.transaction_id, i)
        raise_if(violations)
        return [tx_from_proto(t) for t in transactions]

    # --- RPCs ---
    async def ScoreTransaction(
        self, request: risk_pb2.ScoreTransactionRequest, context: grpc.aio.ServicerContext
    ) -> risk_pb2.ScoreTransactionResponse:
        # ``transaction`` and its required fields: the runtime, by the contract (risk.proto)
        self.slot.require()
        (tx,) = self._checked([request.transaction], "transaction.")
        assessment = await self.batcher.submit(tx, context.time_remaining())
        return risk_pb2.ScoreTransactionResponse(assessment=assessment)

    async def ScoreTransactions(
        self, request: risk_pb2.ScoreTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> risk_pb2.ScoreTransactionsResponse:
        # The contract caps a call at 10,000 (risk.proto); the setting may be stricter.
        n, limit = len(request.transactions), self.settings.risk_max_transactions
        if n > limit:
            raise InvalidArgument(
                [Violation("transactions", f"must hold at most {limit} items (got {n}): split the call")]
            )
        self.slot.require()  # at least one transaction: the runtime, by the contract

        def run() -> list[risk_pb2.RiskAssessment]:
            return self.assess(self._checked(request.transactions, "transactions[{i}]."))

        assessments = await asyncio.to_thread(run)
        return risk_pb2.ScoreTransactionsResponse(assessments=assessments)

    async def ReportOutcome(
        self, request: risk_pb2.ReportOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> risk_pb2.ReportOutcomeResponse:
        # transaction_id and outcome (a defined one, not UNSPECIFIED), lengths and reported_time's
        # range (2000..2100): the runtime, by the contract
        violations = []
        now_ms = int(time.time() * 1000)
        reported_ms = now_ms
        if request.HasField("reported_time"):
            reported_ms = timestamp_ms(request.reported_time)
            if reported_ms > now_ms + self.settings.risk_max_future_s * 1000:
                violations.append(Violation("reported_time", "is in the future"))
        raise_if(violations)
        known = await asyncio.to_thread(
            self.state.record_outcome, request.transaction_id, int(request.outcome), reported_ms, request.note
        )
        self.metrics.outcomes.labels(risk_pb2.Outcome.Name(request.outcome)).inc()
        return risk_pb2.ReportOutcomeResponse(transaction_known=known)


def build(runtime: Runtime) -> RiskService:
    return RiskService(runtime)


__all__ = ["RiskService", "RiskSettings", "build", "validate_transaction"]
