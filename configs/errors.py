"""The project's exception hierarchy; each class maps to one HTTP status."""

from __future__ import annotations


class FraudScoringError(Exception):
    """Base class. `status_code` is the HTTP answer when it reaches the API."""

    status_code = 500


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


class ModelVersionMismatchError(ModelUnavailableError):
    """A model's feature-set version differs from the code's."""


class IntegrityError(ModelUnavailableError):
    """An artifact's sha256 does not match the recorded one."""


class BackpressureError(FraudScoringError):
    """A bounded buffer is full: refuse rather than drop."""

    status_code = 503
