"""OpenAI-style JSON errors: every error the server answers has this one shape.

{"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# The OpenAI error `type` for each status the server answers with.
TYPES = {
  400: "invalid_request_error",
  401: "authentication_error",
  404: "not_found_error",
  405: "invalid_request_error",
  413: "invalid_request_error",
  429: "rate_limit_error",
  500: "server_error",
  503: "server_error",
  504: "timeout_error",
}


class APIError(Exception):
  """An error answered as an OpenAI-style JSON body with an HTTP status."""

  def __init__(
    self, status: int, message: str, code: str | None = None, param: str | None = None, counted: bool = False
  ):
    super().__init__(message)
    self.status, self.message, self.code, self.param = status, message, code, param
    self.counted = counted  # already in jaxmoe_requests_total (the hub counted it)

  def body(self) -> dict:
    return error_body(self.status, self.message, self.code, self.param)

  def response(self) -> JSONResponse:
    return JSONResponse(self.body(), status_code=self.status)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
  kind = TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
  return APIError(400, message, param=param)
