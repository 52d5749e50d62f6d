-- Device compartment rows stay: resource_compartments is append-only, and an older server
-- that never reads them is no less strict for their presence.
SELECT 1;
