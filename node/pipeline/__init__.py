"""Pipeline stages. Each is one unit with a typed input (a claimed Job) and a
persisted output (rows/files), so a crash between stages loses nothing:
infer (Result row) -> encode (Output rows + FHIR) -> deliver (per destination)."""
