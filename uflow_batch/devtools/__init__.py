"""Demo and test tooling, not the product: real local services and generated data instead of mocks."""
