"""One routes module per resource; each holds an `APIRouter` named `router`."""
