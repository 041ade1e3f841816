"""A model that always fails, for failure-path tests."""


def broken(messages):
    raise ConnectionError("the endpoint is down")
