"""The service's exceptions; the app turns each into its status code and the response envelope."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `status` is the HTTP status; the message is shown to the client as is."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    """Invalid input; the message names the field and the rule."""

    status = 400


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    """A credential that is not the key (a signed URL) did not check out."""

    status = 403


class NotFound(ServiceError):
    status = 404


class PayloadTooLarge(ServiceError):
    status = 413


class Conflict(ServiceError):
    status = 409


class TooManyRequests(ServiceError):
    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BadGateway(ServiceError):
    """A service this one depends on (the prompt refiner) answered with an error or nothing usable."""

    status = 502


class Unavailable(ServiceError):
    status = 503


class GatewayTimeout(ServiceError):
    status = 504
