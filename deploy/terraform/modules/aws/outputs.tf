output "public_ips" {
  description = "Public addresses of the agents, in the order of var.names."
  value       = [for n in var.names : aws_eip.agent[n].public_ip]
}

output "agents" {
  value = { for n in var.names : n => aws_eip.agent[n].public_ip }
}
