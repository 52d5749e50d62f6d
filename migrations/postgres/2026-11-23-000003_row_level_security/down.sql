DROP POLICY fhirvault_access ON resource_versions;
ALTER TABLE resource_versions NO FORCE ROW LEVEL SECURITY;
ALTER TABLE resource_versions DISABLE ROW LEVEL SECURITY;
