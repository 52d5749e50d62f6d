// A certified OpenID provider (oidc-provider, npm) on loopback, as fhirvault's external issuer in
// the conformance suite: one backend client (client_credentials) whose access tokens are JWTs for
// the resource (audience) it names with `resource`, carrying the SMART scopes it asked for.
//
// Usage: node provider.mjs PORT  (prints "ready" when listening)
import Provider from "oidc-provider";

const port = Number(process.argv[2]);
const issuer = `http://127.0.0.1:${port}`;
const scopes = ["system/*.rs", "system/Patient.rs", "system/Observation.rs"];

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: "suite-backend",
      client_secret: "suite-backend-secret-not-for-production",
      grant_types: ["client_credentials"],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: "client_secret_basic",
    },
  ],
  scopes,
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => ({
        scope: scopes.join(" "),
        audience: resource,
        accessTokenFormat: "jwt",
        accessTokenTTL: 300,
        jwt: { sign: { alg: "RS256" } },
      }),
    },
  },
});
provider.listen(port, "127.0.0.1", () => console.log("ready"));
