"""What runs the services rather than what they are: the local stack of `make run` and the
tests (`deploy.devstack`), beside the gateway template, alert rules and dashboard that deploy
them. Not part of the wheel: a service never imports it."""
