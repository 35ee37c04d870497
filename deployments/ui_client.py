"""The UI's typed HTTP client of the scoring API: every failure becomes a
`ScoringApiError` whose message is meant for a person (unreachable API, refused
key, 422 naming the field, the 503 detail that says how to train a model)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import httpx
from configs.errors import FraudScoringError

log = logging.getLogger(__name__)


DEFAULT_TIMEOUT_S = 30.0


class ScoringApiError(FraudScoringError):
    """A call to the scoring API failed; `str(error)` is meant for the user.

    `status_code` is the API's answer, or 503 when it could not be reached.
    """

    def __init__(self, message: str, status_code: int = 503) -> None:
        super().__init__(message)
        self.status_code = status_code


def _describe_422(detail: Any) -> str:
    """FastAPI validation errors as `field amount: msg; field country: msg`."""
    if not isinstance(detail, list):
        return f"Invalid input: {detail}"
    parts = []
    for item in detail:
        if not isinstance(item, dict):
            parts.append(str(item))
            continue
        loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
        name = ".".join(loc) or "request"
        parts.append(f"field {name}: {item.get('msg', 'invalid value')}")
    return "Invalid input: " + "; ".join(parts)


class ScoringApiClient:
    """Typed access to the scoring application's HTTP API (see the module docstring)."""

    def __init__(self, base_url: str, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                 body: dict[str, Any] | None = None) -> Any:
        if params:
            params = {k: v for k, v in params.items() if v is not None and v != ""}
        try:
            response = self._http.request(method, path, params=params, json=body)
        except httpx.TimeoutException as exc:
            raise ScoringApiError(
                f"The scoring API at {self.base_url} did not answer within {self.timeout:g} s "
                f"({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise ScoringApiError(
                f"The scoring API at {self.base_url} is unreachable: {exc or type(exc).__name__}"
            ) from exc
        if response.is_success:
            try:
                return response.json()
            except ValueError as exc:
                raise ScoringApiError(
                    f"The scoring API at {self.base_url} answered {method} {path} with "
                    f"something that is not JSON", 502) from exc
        raise ScoringApiError(self._error_message(response), response.status_code)

    def _error_message(self, response: httpx.Response) -> str:
        try:
            detail = response.json().get("detail", response.text)
        except (ValueError, AttributeError):
            detail = response.text[:300] or response.reason_phrase
        status = response.status_code
        if status == 401:
            return (f"The scoring API at {self.base_url} refused the request: the API key is "
                    f"missing or wrong (401). Set FRAUD_API_KEY for the UI.")
        if status == 422:
            return _describe_422(detail)
        if status == 413:
            return f"The request is too large (413): {detail}"
        if status in (404, 409, 503):
            return str(detail)
        return f"The scoring API answered {status}: {detail}"

    # One method per endpoint of the contract.

    def predict(self, transaction: dict[str, Any], dry_run: bool = True) -> dict[str, Any]:
        return self._request("POST", "/predict", params={"dry_run": str(dry_run).lower()},
                             body=transaction)

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/models")

    def activate(self, version: str) -> dict[str, Any]:
        return self._request("POST", f"/models/{quote(version, safe='')}/activate")

    def transaction(self, transaction_id: str) -> dict[str, Any]:
        return self._request("GET", f"/transactions/{quote(transaction_id, safe='')}")

    def audit(self, *, anomalies_only: bool = False, user_id: str | None = None,
              source: str | None = None, since: str | None = None, until: str | None = None,
              limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return self._request("GET", "/audit", params={
            "anomalies_only": str(bool(anomalies_only)).lower(), "user_id": user_id,
            "source": source, "since": since, "until": until, "limit": limit, "offset": offset})

    def dead_letters(self, *, limit: int = 50, offset: int = 0,
                     reason: str | None = None) -> dict[str, Any]:
        return self._request("GET", "/dead-letters",
                             params={"limit": limit, "offset": offset, "reason": reason})

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/stats")

    def recent_users(self) -> list[str]:
        return list(self._request("GET", "/users/recent").get("users", []))
