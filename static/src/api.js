// The JSON HTTP API (same origin, session cookie).

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

export async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { accept: "application/json" } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "network", "Cannot reach the server. Check your connection and try again.");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    const retry = Number(response.headers.get("retry-after")) || null;
    throw new ApiError(response.status, error.code || "error", error.message || `HTTP ${response.status}`, retry);
  }
  return data;
}

export const getMe = () => api("GET", "/api/me");
export const login = (email, password) => api("POST", "/api/session", { email, password });
export const logout = () => api("DELETE", "/api/session");
export const listRooms = () => api("GET", "/api/rooms");
export const roomHistory = (roomId, before, limit = 50) =>
  api("GET", `/api/rooms/${roomId}/messages?limit=${limit}${before ? `&before=${before}` : ""}`);
export const previewInvitation = (code) => api("GET", `/api/invitations/${encodeURIComponent(code)}`);
export const acceptInvitation = (body) => api("POST", "/api/invitations/accept", body);
export const listInstitutions = () => api("GET", "/api/institutions");
const doc = (roomId, name) => `/api/rooms/${roomId}/documents/${encodeURIComponent(name)}`;
export const listVersions = (roomId, name) => api("GET", `${doc(roomId, name)}/versions`);
export const createVersion = (roomId, name, versionName) => api("POST", `${doc(roomId, name)}/versions`, { name: versionName });
export const getVersion = (roomId, name, id) => api("GET", `${doc(roomId, name)}/versions/${id}`);
export const restoreVersion = (roomId, name, id) => api("POST", `${doc(roomId, name)}/versions/${id}/restore`);
