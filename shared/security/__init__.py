"""The secure deployment profile: a development CA (pki), per-role ACLs generated from
the topic registry (acl), and the state folder of identities and broker files (creds).
docs/SECURITY.md describes the profile and what it does and does not protect."""
