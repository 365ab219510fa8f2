// Shared by the dashboard's pages: API calls with the session cookie, HTML escaping, the header.
'use strict';

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === 'string' ? detail : JSON.stringify(detail));
    this.status = status; this.detail = detail;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {credentials: 'same-origin', ...options});
  if (response.status === 401) {
    location.href = `/login?next=${encodeURIComponent(location.pathname)}`;
    throw new ApiError(401, 'logged out');
  }
  const type = response.headers.get('content-type') || '';
  const body = response.status === 204 ? null : type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, body && body.detail !== undefined ? body.detail : body);
  return body;
}

const esc = s => String(s ?? '').replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const fmt = v => typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v ?? '');
const when = iso => iso ? new Date(iso + (iso.endsWith('Z') ? '' : 'Z')).toLocaleString() : '';
const ago = iso => {
  if (!iso) return '';
  const s = Math.max(0, (Date.now() - new Date(iso + (iso.endsWith('Z') ? '' : 'Z'))) / 1000);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
};

function header(active) {
  const links = [['/', 'Studies'], ['/workers', 'Workers']]
    .map(([href, label]) => `<a href="${href}" class="${active === href ? 'active' : ''}">${label}</a>`).join('');
  document.querySelector('header').innerHTML =
    `<a class="brand" href="/">mmmo</a><nav>${links}</nav>` +
    `<form method="post" action="/logout" class="logout"><button type="submit">Log out</button></form>`;
}
