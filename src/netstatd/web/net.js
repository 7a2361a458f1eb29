// IP address helpers. No DOM, no state.

export function isLoopback(ip) {
  return typeof ip === "string" && (ip.startsWith("127.") || ip === "::1");
}

export function familyOf(ip) {
  return typeof ip === "string" && ip.includes(":") ? "IPv6" : "IPv4";
}

export function basename(path) {
  if (!path) return "";
  const i = path.lastIndexOf("/");
  return i < 0 ? path : path.slice(i + 1);
}

// "a.b.c.d:port" or "[v6]:port", for dedup keys and free-text search.
export function hostPort(ip, port) {
  return ip && ip.includes(":") ? `[${ip}]:${port}` : `${ip}:${port}`;
}
