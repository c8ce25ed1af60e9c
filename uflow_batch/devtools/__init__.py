"""Development tools: real local services that tests and the demo run against instead of mocks."""
