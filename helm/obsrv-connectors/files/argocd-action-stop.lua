-- Argo CD resource action "stop" for obsrv.io/Connector: sets spec.state to Stopped.
obj.spec.state = "Stopped"
return obj
