"""The project's exception hierarchy; each class maps to one HTTP status."""

from __future__ import annotations


class FraudScoringError(Exception):
    """Base class. `status_code` is the HTTP answer when it reaches the API.

    A 4xx message describes the client's input and is answered as it is; a 5xx
    message may name hosts, users or paths, so clients get `public` instead and
    the log gets the message."""

    status_code = 500
    public = "internal error"

    def public_detail(self) -> str:
        return str(self) if self.status_code < 500 else self.public


class InvalidInputError(FraudScoringError, ValueError):
    """Input broke a rule; the message names the field and the rule."""

    status_code = 422


class ConflictError(FraudScoringError):
    """The same transaction id arrived with another payload, or a pinned version."""

    status_code = 409


class NotFoundError(FraudScoringError, LookupError):
    status_code = 404


class ModelUnavailableError(FraudScoringError):
    """No active model, or a model that cannot be loaded."""

    status_code = 503
    public = "no model can be served now: see GET /health"


class ModelVersionMismatchError(ModelUnavailableError):
    """A model's feature-set version differs from the code's."""


class IntegrityError(ModelUnavailableError):
    """An artifact's sha256 does not match the recorded one."""


class BackpressureError(FraudScoringError):
    """A bounded buffer is full: refuse rather than drop."""

    status_code = 503
    public = "the audit database is unavailable and the local spool is full: retry later"
