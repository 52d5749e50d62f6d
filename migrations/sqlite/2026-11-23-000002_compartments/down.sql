DROP TABLE resource_compartments;
