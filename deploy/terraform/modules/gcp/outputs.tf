output "public_ips" {
  description = "Public addresses of the agents, in the order of var.names."
  value       = [for n in var.names : google_compute_address.agent[n].address]
}

output "agents" {
  value = { for n in var.names : n => google_compute_address.agent[n].address }
}
